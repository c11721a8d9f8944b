"""Decode speed per format: every quantized size against the original in the same format and the
float32 original, measured in one process (alternating, after warm-up), plus the resident bytes.

    .venv/bin/python benchmarks/format_speed.py [--formats int8,int4-g32] [--sizes 0.5,0.7,0.9]
Writes benchmarks/results/format_speed.json and prints a table. Run it on an idle machine (2 threads).
Also: a new (size, format) in milliseconds (median of 50 random ratios, family already built), and
the process RSS growth of materializing the 0.5 size in each format (tensors really int8/int4).
"""

import argparse
import random
import statistics
import time

import torch

import common  # noqa: E402  (the repository on sys.path, the shared options)

from acip_core.evaluation.bench import compare_speed, cpu_flags  # noqa: E402
from acip_core.engine.materialize import count_bytes  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main():
    p = argparse.ArgumentParser()
    common.add_artifact(p)
    p.add_argument("--formats", default="bfloat16,int8,int4-g32,int8+emb8,int4-g32+emb8")
    p.add_argument("--sizes", default="0.5,0.7,0.9")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=44)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/format_speed.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = open_artifact(args.artifact)
    out = dict(cpu_flags=cpu_flags(), threads=torch.get_num_threads(), torch=torch.__version__, rows=[])
    for key in args.formats.split(","):
        before = rss_mb()
        start = time.perf_counter()
        model.materialize(model.size_for_ratio(0.5, key), key)  # builds the family once
        family_s = time.perf_counter() - start
        rng, times = random.Random(0), []
        for _ in range(50):
            r = rng.uniform(0.3, 1.0)
            t = time.perf_counter()
            model.materialize(model.size_for_ratio(r, key), key)
            times.append(time.perf_counter() - t)
        before_size = rss_mb()
        net = model.materialize(model.size_for_ratio(0.5, key), key)
        size_rss = rss_mb() - before_size
        held = count_bytes(net)
        del net
        for r in (float(x) for x in args.sizes.split(",")):
            res = compare_speed(model, r, key, args.prompt_tokens, args.new_tokens, args.rounds)
            res.update(family_build_s=family_s, family_rss_mb=before_size - before,
                       new_size_median_ms=1e3 * statistics.median(times), size_0_5_held_mb=held / 1e6,
                       size_0_5_rss_growth_mb=size_rss)
            out["rows"].append(res)
            print(f"{key:14s} size {res['size_ratio']:.2f}: decode {res['decode_tok_s_compressed']:6.1f} tok/s "
                  f"= {res['decode_speedup']:.2f}x the {key} original ({res['decode_tok_s_original']:.1f}), "
                  f"{res['decode_speedup_vs_float32']:.2f}x the float32 original; "
                  f"{res['gb_compressed']:.3f} GB; new size {res['new_size_median_ms']:.1f} ms", flush=True)
    common.write_result("format_speed", out, args.out)
    print(f"cpu: {out['cpu_flags']}, {out['threads']} threads; wrote {args.out}")


if __name__ == "__main__":
    main()

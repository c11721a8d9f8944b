"""Perplexity speed of the formats with their bf16 products as shipped (kernels.bf16_linear: many rows
in float32 on CPUs without bf16 instructions) against plain bf16 products, in one process, alternating.

    .venv/bin/python benchmarks/bf16_speed.py [--formats bfloat16,int8,int4-g32] [--size-ratio 0.5] [--windows 8]
The plain rows are the same model with the float32 path switched off (`kernels._fast_bf16` forced
True): in bfloat16 every linear product differs, in int8/int4 only the LM head's (their other
products are the int kernels). Perplexities must agree to bf16 rounding. Run it on an idle machine;
prints tokens/s and the perplexity of each.
"""

import argparse
import statistics

import torch

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.formats import kernels  # noqa: E402
from acip_core.evaluation.bench import cpu_flags  # noqa: E402
from acip_core.sources.data import load_text, token_windows  # noqa: E402
from acip_core.evaluation.evaluate import perplexity  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    common.add_artifact(p)
    p.add_argument("--formats", default="bfloat16,int8,int4-g32")
    p.add_argument("--size-ratio", type=float, default=0.5)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    model = open_artifact(args.artifact)
    windows = token_windows(model.tokenizer, load_text("corpus:heldout"), 256, args.windows)
    shipped = kernels._fast_bf16
    fast = shipped()
    print(f"cpu: {cpu_flags()}, bf16 instructions: {fast}, {torch.get_num_threads()} threads, "
          f"{args.windows} windows x 256 tokens, batch 4")
    for key in ["float32"] + args.formats.split(","):
        net = model.materialize(model.size_for_ratio(args.size_ratio, key), key)
        runs = {"shipped": [], "plain bf16": []}
        for _ in range(args.rounds):
            for name in runs:
                kernels._fast_bf16 = (lambda: True) if name == "plain bf16" else shipped
                runs[name].append(perplexity(net, windows))
        kernels._fast_bf16 = shipped
        for name, rs in runs.items():
            if key == "float32" and name != "shipped":
                continue
            print(f"{key:10s} size {args.size_ratio}  {name:16s} {statistics.median(r['tokens_per_s'] for r in rs):7.0f} "
                  f"tok/s  perplexity {rs[0]['perplexity']:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Load time and time to change size of an any-size folder (python -m acip_core export --any-size).

    .venv/bin/python -m acip_core export --artifact precomputed/smollm2-135m-instruct --any-size --out out/smol-any
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/anysize_speed.py out/smol-any [--repeats 5] [--formats float8] [--json]

Prints, from fresh processes (one per load, so the OS file cache is the only thing shared):
- load_s: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, size_ratio=1.0, format=F)
  to a runnable model, median of --repeats processes, per format;
- first_size_s: the first set_size in a format (builds that format's tensors: casts, int8 codes);
- set_size_s: later set_size calls in the same format, median over sizes 0.4..0.9 (the time to change size);
- first_forward_s: the first forward after a size change (int4 packs its codes for the CPU kernel then).
Run it on a quiet machine: the figures are wall times."""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json, sys, time, torch
from transformers import AutoModelForCausalLM
folder, fmt = sys.argv[1], sys.argv[2]
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, size_ratio=1.0, format=fmt).eval()
load = time.perf_counter() - t
other = "float32" if fmt != "float32" and "float32" in model.acip_formats else None
t = time.perf_counter(); model.set_size(0.95, fmt); first = time.perf_counter() - t
ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
sizes, forwards = [], []
for r in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
    t = time.perf_counter(); model.set_size(r, fmt); sizes.append(time.perf_counter() - t)
    t = time.perf_counter()
    with torch.no_grad():
        model(ids)
    forwards.append(time.perf_counter() - t)
print(json.dumps(dict(load_s=load, first_size_s=first, set_size_s=sorted(sizes)[len(sizes) // 2],
                      first_forward_s=sorted(forwards)[len(forwards) // 2], threads=torch.get_num_threads())))
'''


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--formats", default=None, help="comma list of the folder's format keys (default: all)")
    args = parser.parse_args()
    config = json.load(open(os.path.join(args.folder, "config.json")))
    formats = args.formats.split(",") if args.formats else list(config["acip_anysize"]["formats"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = {}
    for fmt in formats:
        runs = []
        for _ in range(args.repeats):
            p = subprocess.run([sys.executable, "-c", CHILD, args.folder, fmt], capture_output=True, text=True,
                               env=env, timeout=1200)
            if p.returncode:
                sys.exit(p.stderr[-3000:])
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        out[fmt] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    result = dict(folder=args.folder, cpu=cpu, repeats=args.repeats, formats=out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.folder} on {cpu} (median of {args.repeats} processes)")
        for fmt, r in out.items():
            print(f"{fmt:>10}: load {r['load_s']:.2f} s, first size {r['first_size_s']:.3f} s, "
                  f"change size {r['set_size_s'] * 1e3:.1f} ms, first forward {r['first_forward_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

"""What quantization alone costs at each size: an int size against its float32 twin.

An int size runs more layers dense than float32 at the same size ratio (the per-call charge,
`Format.call_bytes`) and rounds kept ranks up to the rank step, so "int8 at 0.5 vs float32 at 0.5"
compares two different models. The twin is float32 with exactly the int size's structure: every layer
dense where the int size runs it dense, and the same kept rank (LoRA rows included) where it is
factorized. The ratio int / twin is the cost of the quantization alone.

    .venv/bin/python benchmarks/quant_cost.py [--formats int8,int4-g32] [--sizes 0.3:1.0:0.1] [--windows 16]
Prints a markdown table per eval set (perplexity, the int size's ratio to its twin).
"""

import argparse

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.sources.data import load_text, token_windows  # noqa: E402
from acip_core.evaluation.evaluate import perplexity  # noqa: E402
from acip_core.formats.registry import parse_format  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


def twin_ranks(model, size):
    """float32 ranks with the int size's structure (dense -> full rank, else its kept rank)."""
    fmt, lora = size.format, model.lora_rank
    ranks = {}
    for n, r in size.ranks.items():
        shape = model.shapes[n]
        if shape.format_bytes(r, lora, fmt)[1]:
            ranks[n] = shape.full_rank  # float32 runs a full-rank layer dense
        else:
            ranks[n] = min(fmt.kept_rank(lora + r, shape.padded_rank(lora, fmt)) - lora, shape.full_rank)
    return ranks


def main():
    p = argparse.ArgumentParser()
    common.add_artifact(p)
    p.add_argument("--formats", default="int8,int4-g32")
    p.add_argument("--sizes", default="0.3:1.0:0.1")
    p.add_argument("--windows", type=int, default=16)
    args = p.parse_args()
    lo, hi, step = (float(x) for x in args.sizes.split(":"))
    sizes = [round(lo + i * step, 4) for i in range(int(round((hi - lo) / step)) + 1)]
    model = open_artifact(args.artifact)
    evals = {name: token_windows(model.tokenizer, load_text(f"corpus:{name}"), 256, args.windows)
             for name in ("heldout", "domain")}
    table = {name: [] for name in evals}
    for key in args.formats.split(","):
        fmt = parse_format(key)
        for target in sizes:
            size = model.size_for_ratio(target, fmt)
            net, twin = model.materialize(size, fmt), model.materialize(twin_ranks(model, size), "float32")
            for name, windows in evals.items():
                q = perplexity(net, windows)["perplexity"]
                f = perplexity(twin, windows)["perplexity"]
                table[name].append((fmt.key, target, size.dense_layers, f, q))
                print(f"{fmt.key} {target} {name}: twin {f:.2f}  {fmt.key} {q:.2f} ({q / f - 1:+.1%})", flush=True)
            del net, twin
    for name, rows in table.items():
        print(f"\n{name}:\n\n| format | size | dense layers | float32 twin | quantized | cost |\n|---|---|---|---|---|---|")
        for key, target, dense, f, q in rows:
            print(f"| {key} | {target} | {dense} | {f:.2f} | {q:.2f} | {q / f - 1:+.1%} |")


if __name__ == "__main__":
    main()

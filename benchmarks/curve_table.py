"""Markdown tables of an artifact's curve.csv: perplexity per size and method, and ratios to the original.

    .venv/bin/python benchmarks/curve_table.py [--artifact precomputed/smollm2-135m-instruct] [--format bfloat16]
One format's rows (the baselines are measured in bfloat16: benchmarks/curve_formats.sh).
Block removal has its own discrete sizes: each row shows its smallest size at or above the row's.
ACIP at a size ratio holds more parameters than the SVD baselines (its merged LoRA: rank + 32 per
low-rank layer), so the parameter counts are printed too.
"""

import argparse

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.artifacts.artifact import load_artifact  # noqa: E402
from acip_core.evaluation.curve import curve_frame  # noqa: E402

BASELINES = ["whitened-magnitude", "uniform-whitened", "svd-magnitude"]


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    parser.add_argument("--format", default="bfloat16")
    args = parser.parse_args()
    curve = curve_frame(load_artifact(args.artifact).curve)
    curve = curve[curve.format == args.format]
    original = curve[curve.method == "original"].iloc[0]
    blocks = curve[curve.method == "block-removal"].sort_values("size_ratio")
    for col in [c for c in curve.columns if c.startswith("ppl_")]:
        ref = original[col]
        table = curve[curve.method.isin(["acip"] + BASELINES)].pivot_table(index="target", columns="method",
                                                                         values=[col, "params"])
        methods = [m for m in BASELINES if m in table[col]]
        print(f"\n#### perplexity on `{col[4:]}`, {args.format}, {int(original.windows)} windows "
              f"(original {ref:.2f}; ratio to it in brackets)\n")
        columns = ["size", "ACIP params", "acip", *methods, "block-removal (its size)"]
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for target, row in table.iterrows():
            cells = [f"{row[(col, m)]:.4g} ({row[(col, m)] / ref:.2f}×)" for m in ["acip"] + methods]
            above = blocks[blocks.size_ratio >= target - 1e-9]
            block = "—" if not len(above) else \
                f"{above.iloc[0][col]:.4g} ({above.iloc[0][col] / ref:.2f}×) at {above.iloc[0].size_ratio:.3f}"
            print(f"| {target:.2f} | {row[('params', 'acip')] / 1e6:.1f} M | " + " | ".join(cells) + f" | {block} |")
        std = f"nll_std_{col[4:]}"
        if std in curve:
            acip = curve[curve.method == "acip"]
            print(f"\nspread across windows (std of the per-window NLL) for ACIP: "
                  f"{acip[std].min():.3f}–{acip[std].max():.3f}")


if __name__ == "__main__":
    main()

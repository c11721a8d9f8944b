"""Markdown tables of an artifact's curve.csv: perplexity per size and method, and ratios to the original.

    .venv/bin/python benchmarks/curve_table.py [--artifact precomputed/smollm2-135m-instruct]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from acip_core.artifact import load_artifact  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", default="precomputed/smollm2-135m-instruct")
    args = parser.parse_args()
    curve = load_artifact(args.artifact).curve
    original = curve[curve.method == "original"].iloc[0]
    for col in [c for c in curve.columns if c.startswith("ppl_")]:
        name = col[4:]
        grid = curve[curve.method.isin(["acip", "svd-magnitude", "whitened-magnitude", "uniform-whitened"])]
        table = grid.pivot_table(index="target", columns="method", values=col)
        methods = [m for m in ["acip", "whitened-magnitude", "uniform-whitened", "svd-magnitude"] if m in table]
        print(f"\n#### perplexity on `{name}` (original {original[col]:.2f}; ratio to it in brackets)\n")
        print("| size | " + " | ".join(methods) + " |")
        print("|---|" + "---|" * len(methods))
        for target, row in table.iterrows():
            cells = [f"{row[m]:.4g} ({row[m] / original[col]:.2f}×)" for m in methods]
            print(f"| {target:.2f} | " + " | ".join(cells) + " |")
        blocks = curve[curve.method == "block-removal"].sort_values("size_ratio", ascending=False)
        if len(blocks):
            print(f"\nblock removal on `{name}` (its own sizes): " + ", ".join(
                f"{r.size_ratio:.3f}: {r[col]:.4g}" for r in blocks.itertuples()))
        std = f"nll_std_{name}"
        if std in curve:
            acip = curve[curve.method == "acip"]
            print(f"\nspread across windows (std of the per-window NLL) for ACIP: "
                  f"{acip[std].min():.3f}–{acip[std].max():.3f}")


if __name__ == "__main__":
    main()

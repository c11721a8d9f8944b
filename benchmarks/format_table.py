"""The shipped curve by format: GB vs perplexity per format, the frontier, and the budget picker
against the best single-axis choice (quantization alone: the original in some format; ACIP alone:
ACIP in a float format), on both eval sets (the plots: benchmarks/plot_curve.py). Only rows measured
on the same windows as the pick are compared.

    .venv/bin/python benchmarks/format_table.py [--artifact precomputed/smollm2-135m-instruct]
"""

import argparse

import numpy as np

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.artifacts.artifact import load_artifact  # noqa: E402
from acip_core.evaluation.curve import best_for_budget, curve_frame, interpolate_ppl, pareto_frontier  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    common.add_artifact(p)
    p.add_argument("--budgets", default="0.10,0.11,0.12,0.13,0.14,0.15,0.16,0.18,0.20,0.25,0.30,0.40,0.55")
    args = p.parse_args()
    curve = curve_frame(load_artifact(args.artifact).curve)
    model = open_artifact(args.artifact)
    rows = curve[curve.method.isin(["acip", "original"])]
    formats = list(dict.fromkeys(rows[rows.method == "acip"].format))
    for eval_set in ("heldout", "domain"):
        col = f"ppl_{eval_set}"
        print(f"\n## {eval_set}: perplexity by format (GB in brackets); windows per row in curve.csv\n")
        sizes = sorted(set(rows[rows.method == "acip"].size_ratio.round(2)))
        print("| size | " + " | ".join(formats) + " |")
        print("|---|" + "---|" * len(formats))
        for r in sizes:
            cells = []
            for f in formats:
                hit = rows[(rows.method == "acip") & (rows.format == f) & (rows.size_ratio.round(2) == r)]
                cells.append(f"{hit[col].iloc[0]:.2f} ({hit.gb.iloc[0]:.3f})" if len(hit) else "")
            print(f"| {r:.2f} | " + " | ".join(cells) + " |")
        orig = rows[rows.method == "original"]
        print("| original | " + " | ".join(
            (f"{orig[orig.format == f][col].iloc[0]:.2f} ({orig[orig.format == f].gb.iloc[0]:.3f})"
             if (orig.format == f).any() else "") for f in formats) + " |")
        front = pareto_frontier(curve, eval_set)
        print(f"\nfrontier ({eval_set}): " + ", ".join(
            f"{r.format}@{r.size_ratio:.2f} {r.gb:.3f} GB {r[col]:.2f}" for _, r in front.iterrows()))
        print(f"\n| budget GB | pick | ppl | best quantization alone | ppl | best ACIP alone (float) | ppl | gain |")
        print("|---|---|---|---|---|---|---|---|")
        for b in (float(x) for x in args.budgets.split(",")):
            try:
                pick = best_for_budget(model, curve, b, eval_set)
            except ValueError as err:
                print(f"| {b:.2f} | {err} |")
                continue
            # only rows measured on the pick's windows are compared (perplexities of other windows differ)
            windows = rows[rows.format == pick["format"]].windows.iloc[0]
            # quantization alone: the original in a format (a fast layout's original is the small one's)
            q = orig[(orig.gb <= b + 1e-12) & (orig.windows == windows) & ~orig.format.str.endswith("+fast")]
            q = q.sort_values(col).head(1)
            alone = []
            for f in ("float32", "bfloat16"):
                if not ((rows.method == "acip") & (rows.format == f) & (rows.windows == windows)).any():
                    continue
                try:
                    size = model.size_for_budget(b, f)
                except ValueError:
                    continue
                ppl = interpolate_ppl(rows[(rows.method == "acip") & (rows.format == f)], size.size_ratio, eval_set)
                if ppl is not None:
                    alone.append((ppl, f"{f}@{size.size_ratio:.2f}"))
            a = min(alone) if alone else (np.nan, "none fits")
            qp, qn = (q[col].iloc[0], f"original {q.format.iloc[0]}") if len(q) else (np.nan, "none fits")
            best_single = np.nanmin([qp, a[0]])
            gain = (best_single / pick["perplexity"] - 1) * 100 if np.isfinite(best_single) else np.nan
            print(f"| {b:.2f} | {pick['format']}@{pick['size_ratio']:.3f} ({pick['gb']:.3f}) | "
                  f"{pick['perplexity']:.2f} | {qn} | {qp:.2f} | {a[1]} | {a[0]:.2f} | "
                  + (f"{gain:+.1f} %" if np.isfinite(gain) else "n/a") + " |")


if __name__ == "__main__":
    main()

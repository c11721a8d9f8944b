"""int4 quantizers compared on the shipped curve (benchmarks/RESULTS.md, "int4 quantizer"): the int4
rows of an earlier curve.csv (round to nearest) against the current ones (GPTQ-style `down`), as ratios
to float32 ACIP on the same windows.

    git show 0234e4f:precomputed/smollm2-135m-instruct/curve.csv > /tmp/curve-rtn.csv
    .venv/bin/python benchmarks/int4_quantizer_table.py /tmp/curve-rtn.csv
"""

import sys

import pandas as pd

FORMATS = ("int4-g32", "int4-g32+emb8")


def row(df, fmt, target):
    method = "original" if target == 1.0 else "acip"
    hit = df[(df.format == fmt) & (df.method == method)]
    if method == "acip":
        hit = hit[(hit.target - target).abs() < 1e-6]
    return hit.iloc[0] if len(hit) else None


def main() -> None:
    before = pd.read_csv(sys.argv[1])
    now = pd.read_csv(sys.argv[2] if len(sys.argv) > 2 else "precomputed/smollm2-135m-instruct/curve.csv")
    for ev in ("heldout", "domain"):
        col = f"ppl_{ev}"
        head = " | ".join(f"{f} RTN (before) | {f} GPTQ" for f in FORMATS)
        print(f"\n{ev}:\n\n| size | float32 | {head} |\n|---|---|" + "---|---|" * len(FORMATS))
        for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            base = row(now, "float32", t)[col]
            cells = []
            for fmt in FORMATS:
                for df in (before, now):
                    r = row(df, fmt, t)
                    cells.append("–" if r is None else f"{r[col]:.2f} ({(r[col] / base - 1) * 100:+.1f} %)")
            print(f"| {t:.1f} | {base:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Markdown table of benchmarks/lmeval_sweep.jsonl (written by benchmarks/lmeval_sweep.sh).

    .venv/bin/python benchmarks/lmeval_table.py [benchmarks/lmeval_sweep.jsonl]
One row per (method, size), one column per task: acc (acc_norm for next-sentence), ± its stderr.
acc_norm for next-sentence because its 4 choices differ in length; last-word choices are single words.
"""

import json
import sys
from pathlib import Path


def main():
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("lmeval_sweep.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: (r["method"] != "acip", r["method"], -r["size_ratio"]))  # file order varies
    tasks = sorted({t for r in rows for t in r["tasks"]})
    print("| method | size ratio | params | " + " | ".join(tasks) + " | seconds |")
    print("|---|---|---|" + "---|" * len(tasks) + "---|")
    for r in rows:
        cells = []
        for t in tasks:
            s = r["tasks"].get(t)
            metric = "acc_norm" if "next_sentence" in t else "acc"
            cells.append("—" if s is None else f"{s[metric]:.3f} ± {s.get(metric + '_stderr') or 0:.3f}")
        print(f"| {r['method']} | {r['size_ratio']:.3f} | {r['params'] / 1e6:.1f} M | " + " | ".join(cells)
              + f" | {r['seconds']:.0f} |")
    items = ", ".join(f"{t} {rows[0]['tasks'][t]['samples']}" for t in tasks)
    print(f"\nitems: {items}; every task has 4 choices (chance 0.25)")


if __name__ == "__main__":
    main()

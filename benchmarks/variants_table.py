"""The table of benchmarks/RESULTS.md "Scoring variants": perplexity (ratio to the original's, same
windows) of each variant's curve at each measured size, on both eval sets, with its steps, time and
memory. Reads runs/variants/<name>/{acip.json,curve.csv} (benchmarks/score_variants.sh).

    python benchmarks/variants_table.py [runs/variants]
"""

import json
import sys
from pathlib import Path

import pandas as pd

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/variants")
rows = []
for folder in sorted(p for p in root.iterdir() if (p / "curve.done").exists()):
    meta = json.loads((folder / "acip.json").read_text())
    curve = pd.read_csv(folder / "curve.csv")
    curve = curve[curve.format == "float32"]
    original = curve[curve.method == "original"].iloc[0]
    res, sc = meta["result"], meta["scoring"]
    for _, r in curve[curve.method == "acip"].sort_values("size_ratio").iterrows():
        cells = {}
        for ev in ("heldout", "domain"):
            ppl, ref = r[f"ppl_{ev}"], original[f"ppl_{ev}"]
            cells[ev] = f"{ppl:.2f} ({ppl / ref:.3f}×)"
        rows.append(dict(variant=folder.name, objective=sc.get("objective", "lm"), base=sc.get("base_format", "float32"),
                         steps=f"{res['acip_steps']} + {res['post_tune_steps']}", minutes=round(res["seconds"] / 60, 1),
                         rss_mib=res.get("steps_rss_mib"), size=round(r.size_ratio, 3), **cells))
    print(f"{folder.name}: original heldout {original.ppl_heldout:.2f}, domain {original.ppl_domain:.2f}",
          file=sys.stderr)
frame = pd.DataFrame(rows)
print(frame.to_markdown(index=False) if len(frame) else "no finished variant under " + str(root))

"""Prints the fine-tuning comparison of benchmarks/RESULTS.md from tuned sizes' tuned.json files.

python benchmarks/finetune_table.py ORIGINAL_JSON runs/ft-*   (ORIGINAL_JSON: {"heldout": ppl, "domain": ppl}
of the original, measured like the tuned sizes: `eval --size-ratio 1.0 --max-windows 32`, float32; a
missing file: no ratios)
Spread: ± one standard error of the mean window NLL, as a factor on the perplexity.
"""

import json
import math
import sys
from pathlib import Path


def main(original_json: str, *folders: str) -> None:
    original = json.loads(Path(original_json).read_text()) if Path(original_json).is_file() else {}
    rows = []
    for folder in folders:
        path = Path(folder) / "tuned.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    rows.sort(key=lambda m: (m["size"]["size_ratio"], m["finetune"]["objective"]))
    sets = list(original) or ["heldout", "domain"]
    head = "| size | run | steps × batch | train wall | peak RSS |" + "".join(
        f" {s} ppl{' (× original)' if original else ''} |" for s in sets)
    print(head)
    print("|" + "---|" * (5 + len(sets)))
    seen = set()
    for m in rows:
        size, ft, res = m["size"]["size_ratio"], m["finetune"], m["result"]
        if size not in seen:  # the untuned row once per size (every run measures it; they agree)
            seen.add(size)
            cells = [_cell(m["perplexity"][s]["untuned"], m["perplexity"][s]["windows"], original.get(s)) for s in sets]
            print(f"| {size:.3f} | untuned | – | – | – |" + "".join(f" {c} |" for c in cells))
        cells = [_cell(m["perplexity"][s]["tuned"], m["perplexity"][s]["windows"], original.get(s)) for s in sets]
        print(f"| {size:.3f} | {ft['objective']} | {res['steps']} × {ft['batch_size']}×{ft['seq_len']} | "
              f"{res['seconds'] / 60:.1f} min | {res['peak_rss_mib'] / 1024:.2f} GiB |" + "".join(f" {c} |" for c in cells))


def _cell(fig: dict, windows: int, original: float | None) -> str:
    se = math.exp(fig["nll_std"] / math.sqrt(windows))
    ratio = f" ({fig['perplexity'] / original:.2f}×)" if original else ""
    return f"{fig['perplexity']:.2f} ×/÷ {se:.3f}{ratio}"


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Prints the fine-tuning comparison of benchmarks/RESULTS.md from tuned sizes' tuned.json files.

python benchmarks/finetune_table.py ORIGINAL_JSON runs/ft-*   (ORIGINAL_JSON: {"heldout": ppl, "domain": ppl}
of the original, measured like the tuned sizes: `eval --size-ratio 1.0 --max-windows 32`, float32; a
missing file: no ratios)
RSS: the process peak (set while loading: basis, factors) / the largest resident size after a step.
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
    rows.sort(key=lambda m: (m["size"]["size_ratio"], m.get("format", "float32"), m["finetune"]["objective"]))
    sets = list(original) or ["heldout", "domain"]
    head = "| size | format | run | steps × batch | train wall | RSS: peak / steps |" + "".join(
        f" {s} ppl{' (× original)' if original else ''} |" for s in sets)
    print(head)
    print("|" + "---|" * (6 + len(sets)))
    seen = set()
    for m in rows:
        size, ft, res, fmt = m["size"]["size_ratio"], m["finetune"], m["result"], m.get("format", "float32")
        if (size, fmt) not in seen:  # the untuned row once per size and format (every run measures it)
            seen.add((size, fmt))
            cells = [_cell(m["perplexity"][s]["untuned"], m["perplexity"][s]["windows"], original.get(s)) for s in sets]
            print(f"| {size:.3f} | {fmt} | untuned | – | – | – |" + "".join(f" {c} |" for c in cells))
        cells = [_cell(m["perplexity"][s]["tuned"], m["perplexity"][s]["windows"], original.get(s)) for s in sets]
        data = "" if ft.get("data", "corpus:broad") == "corpus:broad" else f", {ft['data']}"  # the default text unnamed
        print(f"| {size:.3f} | {fmt} | {ft['objective']}, lr {ft['lr']:g}{data} | {res['steps']} × {ft['batch_size']}×{ft['seq_len']} | "
              f"{res['seconds'] / 60:.1f} min | {res['peak_rss_mib'] / 1024:.2f} / "
              f"{'–' if res.get('steps_rss_mib') is None else format(res['steps_rss_mib'] / 1024, '.2f')} GiB |" + "".join(f" {c} |" for c in cells))


def _cell(fig: dict, windows: int, original: float | None) -> str:
    se = math.exp(fig["nll_std"] / math.sqrt(windows))
    ratio = f" ({fig['perplexity'] / original:.2f}×)" if original else ""
    return f"{fig['perplexity']:.2f} ×/÷ {se:.3f}{ratio}"


if __name__ == "__main__":
    main(*sys.argv[1:])

"""What of a quantize-first score map transfers (issue 11): each scoring variant's curve with its LoRA
adapters as learnt and with them left out, float32, on both eval sets (same windows as
benchmarks/score_variants.sh; "as learnt" is read from each variant's curve.csv, which that script
measured on the same windows). If the int4-base map without adapters matches the float32-base map
without adapters, the pruning order transfers and the adapters (which also learnt int4's rounding)
are what does not.

    .venv/bin/python benchmarks/transfer_adapters.py [--variants short-fp,short-int4] [--sizes 0.7,0.8,0.9]
Prints a markdown table (perplexity and its ratio to the original on the same windows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)
from acip_core.artifacts.artifact import load_artifact  # noqa: E402
from acip_core.evaluation.curve import acip_curve  # noqa: E402
from acip_core.sources.data import load_text, token_windows  # noqa: E402
from acip_core.training.finetune import EVAL_SETS  # noqa: E402
from acip_core.sources.models import load_base  # noqa: E402
from acip_core.artifacts.open import any_size_from  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="runs/variants")
    parser.add_argument("--variants", default="short-fp,short-int4")
    parser.add_argument("--sizes", default="0.7,0.8,0.9")
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    rows = []
    for name in args.variants.split(","):
        artifact = load_artifact(Path(args.root) / name)
        model, tokenizer = load_base(artifact.meta.model.source)
        evals = {k: token_windows(tokenizer, load_text(src), 256, args.windows) for k, src in EVAL_SETS.items()}
        learnt = pd.read_csv(Path(args.root) / name / "curve.csv")  # score_variants.sh: the same windows
        learnt = learnt[learnt.format == "float32"]
        artifact.adapters = {k: torch.zeros_like(v) for k, v in artifact.adapters.items()}  # B = 0: no-op LoRAs
        left_out = acip_curve(any_size_from(artifact, model, tokenizer), evals, sizes)
        for adapters, curve in (("as learnt", learnt), ("left out", left_out)):
            original = curve[curve.method == "original"].iloc[0]
            for _, r in curve[curve.method == "acip"].iterrows():
                if not any(abs(r.size_ratio - s) < 0.01 for s in sizes):
                    continue
                cells = {ev: f"{r[f'ppl_{ev}']:.2f} ({r[f'ppl_{ev}'] / original[f'ppl_{ev}']:.3f}×)" for ev in EVAL_SETS}
                rows.append(dict(variant=name, base=artifact.meta.scoring.get("base_format", "float32"),
                                 adapters=adapters, size=round(r.size_ratio, 3), **cells))
        print(f"{name}: done", file=sys.stderr)
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()

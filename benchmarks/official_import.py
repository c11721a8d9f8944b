"""Official ACIP checkpoints imported (acip_core/artifacts/official.py) against the official code's own numbers.

For each fixture family (Llama, OPT) and storage (full, compact): import into an artifact (each with its
own basis cache), then at every recorded size the achieved ratio (numerator / denominator, ours and
theirs), the materialized ratio (what the model holds in its target layers, LoRA included) and the
largest |logit difference| to the official logits; and the bytes of their files against our artifact.
No timings. Usage:

    python benchmarks/official_import.py [--fixtures ../shared/fixtures/official-acip] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def _tokenizer(folder: Path) -> None:
    """The fixtures' bases have no tokenizer (which loading needs): the tests' one (ids below 256)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_official import _tokenizer as tests_tokenizer

    tests_tokenizer(folder)


def measure(fixtures: Path, work: Path) -> list[dict]:
    from acip_core.artifacts.official import import_official
    from acip_core.training.pipeline import open_artifact

    rows = []
    for fam in ("llama", "opt"):
        copy = work / fam
        shutil.copytree(fixtures / fam, copy)
        _tokenizer(copy / "base")
        expected = json.loads((fixtures / fam / "expected.json").read_text())
        logits = load_file(fixtures / fam / "expected.safetensors")
        ids = torch.tensor(expected["input_ids"])
        for storage in ("full", "compact"):
            os.environ["ACIP_STUDIO_CACHE"] = str(work / f"cache-{fam}-{storage}")
            source = copy if storage == "full" else copy / "compact"
            out = work / f"art-{fam}-{storage}"
            import_official(str(source), out)
            model = open_artifact(out)
            theirs = sum(p.stat().st_size for p in source.iterdir()  # the checkpoint's own files only
                         if p.name in ("config.json", "generation_config.json") or p.name.startswith("model"))
            ours = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
            for key, want in expected["ratios"].items():
                size = model.size_for_ratio(float(key))
                with torch.no_grad():
                    got = model.materialize(size)(ids).logits
                rows.append(dict(family=fam, storage=storage, target=float(key),
                                 ours=f"{int(model.index.paper_cum[size.prefix])}/{model.index.dense_total}",
                                 theirs=f"{want['num_params_compressed']}/{want['num_params']}",
                                 size_ratio=size.size_ratio, same_ratio=size.size_ratio == want["size_ratio"],
                                 same_ranks=size.ranks == {n.removesuffix(".base_layer"): r
                                                           for n, r in want["ranks"].items()},
                                 materialized_ratio=round(model.materialized_ratio(size), 5),
                                 max_abs_logit_diff=float((got - logits[f"logits_{key}"]).abs().max()),
                                 checkpoint_bytes=theirs, artifact_bytes=ours))
            with torch.no_grad():
                base = model.materialize(model.original_size())(ids).logits
            rows.append(dict(family=fam, storage=storage, target="original",
                             max_abs_logit_diff=float((base - logits["logits_base"]).abs().max())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-acip"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(args.fixtures), Path(tmp))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| family | storage | target | ours (num/den) | theirs | same ratio / ranks | materialized ratio "
          "| max abs logit diff | their files (B) | our artifact (B) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["target"] == "original":
            print(f"| {r['family']} | {r['storage']} | original | | | | | {r['max_abs_logit_diff']:.2e} | | |")
            continue
        print(f"| {r['family']} | {r['storage']} | {r['target']:.2f} | {r['ours']} | {r['theirs']} | "
              f"{r['same_ratio']} / {r['same_ranks']} | {r['materialized_ratio']:.4f} | "
              f"{r['max_abs_logit_diff']:.2e} | {r['checkpoint_bytes']:,} | {r['artifact_bytes']:,} |")


if __name__ == "__main__":
    main()

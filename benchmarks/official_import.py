"""Official ACIP checkpoints imported (acip_core/artifacts/official.py) against the official code's own numbers.

For each fixture family (Llama, OPT) and storage (full, compact): import into an artifact (each with its
own basis cache), then at every recorded size the achieved ratio (numerator / denominator, ours and
theirs), the materialized ratio (what the model holds in its target layers, LoRA included) and the
largest |logit difference| to the official logits; and the bytes of their files against our artifact.
With --any-size, each full import is also exported as an any-size folder (float32 and bfloat16): its
bytes against the official files (checkpoint + the base it needs), and the folder loaded with plain
from_pretrained at every recorded size against the official logits. No timings. Usage:

    python benchmarks/official_import.py [--fixtures ../shared/fixtures/official-acip] [--any-size] [--json]
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


def _bytes(folder: Path, keep=lambda p: True) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and keep(p))


def anysize_rows(fam: str, checkpoint: Path, folder: Path, model, expected: dict, logits: dict, ids, work: Path):
    """The any-size folders of an imported full checkpoint: bytes, and the official logits from the folder."""
    from transformers import AutoModelForCausalLM

    from acip_core.artifacts.artifact import load_artifact
    from acip_core.export.anysize import export_anysize

    official = lambda p: p.name in ("config.json", "generation_config.json") or p.name.startswith("model")  # noqa: E731
    theirs = _bytes(checkpoint, lambda p: p.parent == checkpoint and official(p)) + _bytes(checkpoint / "base", official)
    rows = []
    for stored in ("float32", "bfloat16"):
        out = export_anysize(model, work / f"any-{fam}-{stored}", stored, curve=load_artifact(folder).curve)
        row = dict(family=fam, any_size=stored, folder_bytes=_bytes(out), official_bytes=theirs,
                   ratio=round(_bytes(out) / theirs, 3))
        if stored == "float32":
            net = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
            diffs = []
            for key in expected["ratios"]:
                net.set_size(float(key), "float32")
                with torch.no_grad():
                    diffs.append(float((net(ids).logits - logits[f"logits_{key}"]).abs().max()))
            row["max_abs_logit_diff"] = max(diffs)
        rows.append(row)
    return rows


def measure(fixtures: Path, work: Path, any_size: bool = False) -> list[dict]:
    from acip_core.artifacts.official import import_official
    from acip_core.artifacts.open import open_artifact

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
            if any_size and storage == "full":
                rows += anysize_rows(fam, copy, out, model, expected, logits, ids, work)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-acip"))
    parser.add_argument("--any-size", action="store_true", help="also export each full import any-size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(args.fixtures), Path(tmp), args.any_size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| family | storage | target | ours (num/den) | theirs | same ratio / ranks | materialized ratio "
          "| max abs logit diff | their files (B) | our artifact (B) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "any_size" in r:
            continue
        if r["target"] == "original":
            print(f"| {r['family']} | {r['storage']} | original | | | | | {r['max_abs_logit_diff']:.2e} | | |")
            continue
        print(f"| {r['family']} | {r['storage']} | {r['target']:.2f} | {r['ours']} | {r['theirs']} | "
              f"{r['same_ratio']} / {r['same_ranks']} | {r['materialized_ratio']:.4f} | "
              f"{r['max_abs_logit_diff']:.2e} | {r['checkpoint_bytes']:,} | {r['artifact_bytes']:,} |")
    folders = [r for r in rows if "any_size" in r]
    if folders:
        print("\n| family | any-size folder | its bytes | official checkpoint + base (B) | ratio | max abs logit diff |")
        print("|---|---|---|---|---|---|")
        for r in folders:
            diff = f"{r['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in r else ""
            print(f"| {r['family']} | {r['any_size']} | {r['folder_bytes']:,} | {r['official_bytes']:,} | {r['ratio']} | {diff} |")


if __name__ == "__main__":
    main()

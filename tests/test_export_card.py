"""The model card and LICENSE an export writes: parameters counted as weights in every format, a tuned
size says it was fine-tuned (from its tuned.json), the tensor layout it describes is what
model.safetensors holds, and a LICENSE names the base model's licence."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from acip_core.artifacts.meta import ArtifactMeta, BasisInfo, ModelInfo, TunedFrom, TunedMeta
from acip_core.export.folder import LICENSE_FILE
from acip_core.export.sized import export_lowrank
from acip_core.formats.registry import parse_format
from acip_core.sources.models import EMBEDDED
from helpers import random_any_size

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TUNED = ROOT / "precomputed" / "smollm2-135m-instruct" / "tuned" / "0.7" / "tuned.json"


def _meta() -> ArtifactMeta:
    """The least an artifact's metadata holds (random_any_size's model was opened from none)."""
    return ArtifactMeta(model=ModelInfo(source="a-folder"), layers={}, basis=BasisInfo(recipe={}))


@pytest.fixture(scope="module")
def any_size(tiny_llama_wide):
    return random_any_size(tiny_llama_wide)[0]


def _row(card: str, name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", card, re.M)
    assert match, f"no row {name!r} in the card"
    return match.group(1)


@pytest.mark.parametrize("key", ["float32", "int8", "int4-g32", "int4-g32+emb8"])
def test_parameters_row_counts_weights_not_stored_bytes(any_size, tmp_path, key):
    fmt = parse_format(key)
    size = any_size.size_for_ratio(0.6, fmt)
    out = export_lowrank(any_size, size, tmp_path / "e", format=key)
    row = _row((out / "README.md").read_text(), "parameters")
    assert row.startswith(f"{size.params:,} (base model:"), (row, size.params)
    info = json.loads((out / "acip_export.json").read_text())
    assert info["params"] == size.params
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # stored elements: what the row counted before
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert (stored == size.params) == (fmt.name == "float32"), (stored, size.params)


@pytest.mark.parametrize("key", ["float32", "bfloat16", "int8", "int4-g32"])
def test_the_tensor_layout_the_card_describes_is_what_the_file_holds(any_size, tmp_path, key):
    fmt = parse_format(key)
    size = any_size.size_for_ratio(0.5, fmt)
    out = export_lowrank(any_size, size, tmp_path / "e", format=key)
    card = (out / "README.md").read_text()
    ranks = json.loads((out / "config.json").read_text())["acip_ranks"]
    assert ranks, "nothing factorized at this size: the test would prove nothing"
    described = dict(re.findall(r"`<layer>\.([\w.]+)` \[([\w ,/]+)\]", card))
    expected = ({"down.weight": "rank, in", "up_t": "rank, out"} if not fmt.quantized
                else {"down.qweight": "rank, in", "up.qweight": "out, rank"})
    assert {k: v for k, v in described.items() if k in expected} == expected, described
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for layer, rank in ranks.items():
            lin = any_size.base.get_submodule(layer)
            dims = {"rank": rank, "in": lin.in_features, "out": lin.out_features}
            for tensor, shape in expected.items():
                got = f.get_slice(f"{layer}.{tensor}").get_shape()
                want = [dims[d.strip()] for d in shape.split(",")]
                if fmt.name == "int4":  # rows padded to 32, two codes a byte along the input (as the card says)
                    want = [-(-want[0] // 32) * 32, want[1] // 2]
                assert got == want, (layer, tensor, got, want)
                if fmt.quantized:
                    assert f"{layer}.{tensor.rpartition('.')[0]}.scales" in names


def test_a_tuned_size_says_it_was_fine_tuned(any_size, tmp_path):
    """The card of a tuned size (meta.tuned, as artifacts.open.open_folder sets it from tuned.json)."""
    tuned = json.loads(SHIPPED_TUNED.read_text())
    typed = TunedMeta.from_json(tuned, str(SHIPPED_TUNED))
    saved = any_size.meta
    any_size.meta = replace(saved or _meta(), tuned=TunedFrom(
        folder=str(SHIPPED_TUNED.parent), format=typed.format, parent="..", size=typed.size,
        finetune=typed.finetune, perplexity=typed.perplexity))
    try:
        out = export_lowrank(any_size, 0.7, tmp_path / "tuned")
    finally:
        any_size.meta = saved
    card = (out / "README.md").read_text()
    ft = tuned["finetune"]
    assert f"**Fine-tuned**" in card and ft["objective"] in card and f"{ft['steps']} steps" in card
    for name, ppl in tuned["perplexity"].items():
        line = next(l for l in card.splitlines() if f"`corpus:{name}`" in l)
        assert f"{ppl['untuned']['perplexity']:.3f} before" in line and f"{ppl['tuned']['perplexity']:.3f} after" in line
    plain = (export_lowrank(any_size, 0.7, tmp_path / "plain") / "README.md").read_text()
    assert "Fine-tuned" not in plain


def test_license_file_names_the_base_models_licence(any_size, tmp_path):
    out = export_lowrank(any_size, 0.5, tmp_path / "unknown")
    front = (out / "README.md").read_text().split("---")[1]
    assert "license: other" in front and f"license_link: {LICENSE_FILE}" in front
    assert "licence applies" in (out / LICENSE_FILE).read_text()
    saved = any_size.meta
    any_size.meta = replace(saved or _meta(), model=ModelInfo(source=EMBEDDED))
    try:
        out = export_lowrank(any_size, 0.5, tmp_path / "smollm2")
    finally:
        any_size.meta = saved
    front = (out / "README.md").read_text().split("---")[1]
    assert "license: apache-2.0" in front and f"license_link: {LICENSE_FILE}" in front
    text = (out / LICENSE_FILE).read_text()
    assert "Apache License, Version 2.0" in text and "HuggingFaceTB/SmolLM2-135M-Instruct" in text
    assert oct((out / LICENSE_FILE).stat().st_mode & 0o777) == "0o644"


def test_a_local_path_is_shown_by_its_name_only():
    """A folder is pushed to the hub: its card and acip_export.json name a local model or text by its
    last part, never this machine's path."""
    from acip_core.export.folder import shown_source

    assert shown_source("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert shown_source("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert shown_source("hf:allenai/c4:en:train") == "hf:allenai/c4:en:train"
    assert shown_source("corpus:broad") == "corpus:broad"
    assert shown_source("/home/someone/private/models/my-llama") == "my-llama"
    assert shown_source("/home/someone/notes.txt") == "notes.txt"
    assert shown_source(None) is None

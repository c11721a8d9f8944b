"""acip.json and tuned.json as typed records: the shipped files parse, write back as read (unknown keys
kept), and a missing required field is named with its file. No model is loaded."""

import json
import shutil
from pathlib import Path

import pytest

from acip_core.artifacts.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from acip_core.artifacts.meta import ArtifactMeta, TunedMeta
from acip_core.artifacts.tuned import TUNED_DIR, TUNED_FILE, load_tuned
from acip_core.engine.prune import DEFAULT_SIZE_RULE

SHIPPED = Path(__file__).resolve().parent.parent / "precomputed" / "smollm2-135m-instruct"
TUNED = sorted((SHIPPED / TUNED_DIR).iterdir()) if (SHIPPED / TUNED_DIR).is_dir() else []


def _raw(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_shipped_acip_json_parses_into_typed_fields():
    meta = load_artifact(SHIPPED).meta
    assert meta.model.source == "smollm2-135m-instruct" and len(meta.model.fingerprint) == 64
    assert meta.lora.rank == 32 and meta.lora.alpha == 16.0
    assert meta.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(meta.layers) == len(meta.basis.check) == 30 * 7
    assert meta.basis.recipe["kind"] == "whitened"
    assert meta.result.stopped_by == "stop_ratio" and meta.result.size_ratio_reached == pytest.approx(0.39734)
    assert sorted(meta.block_removal_order) == list(range(1, 30))  # every block but the first, once
    assert meta.size_rule == DEFAULT_SIZE_RULE and meta.official is None and meta.tuned is None
    assert meta.extra["mask_scale"] == 0.02  # an untyped key is kept


def test_the_shipped_acip_json_writes_back_byte_identical():
    text = (SHIPPED / "acip.json").read_text(encoding="utf-8")
    meta = ArtifactMeta.from_json(json.loads(text))
    assert json.dumps(meta.to_json(), indent=1) == text


def test_save_artifact_writes_the_same_json_it_loaded(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns(TUNED_DIR))
    before = (folder / "acip.json").read_bytes()
    save_artifact(folder, load_artifact(folder))
    assert (folder / "acip.json").read_bytes() == before  # the tensors and curve re-serialize identically too
    assert load_artifact(folder).meta.block_removal_order == load_artifact(SHIPPED).meta.block_removal_order


def test_unknown_keys_of_another_version_are_kept_on_a_round_trip():
    raw = _raw(SHIPPED / "acip.json")
    raw["written_by_a_newer_version"] = {"anything": [1, 2]}
    raw["model"] = dict(raw["model"], revision="abc")
    raw["baselines"] = dict(raw["baselines"], another_order=[3, 2, 1])
    assert ArtifactMeta.from_json(raw).to_json() == raw


def test_an_older_artifact_without_optional_fields_gains_none():
    raw = dict(model=dict(source="m", fingerprint="f"), layers={"a": [4, 4, False]},
               basis=dict(recipe=dict(kind="svd"), check={}), format_version=1, files={})
    meta = ArtifactMeta.from_json(raw)
    assert meta.lora.rank == 0 and meta.size_rule == DEFAULT_SIZE_RULE and meta.block_removal_order is None
    assert meta.to_json() == raw


def test_an_artifact_built_in_memory_is_parsed_and_its_lora_rank_needs_adapters():
    raw = dict(model=dict(source="m"), layers={}, basis=dict(recipe={}), lora=dict(rank=8, alpha=16.0))
    artifact = Artifact(raw, scores={})
    assert isinstance(artifact.meta, ArtifactMeta) and artifact.meta.lora.rank == 8
    assert artifact.lora_rank == 0  # no adapters: every size runs without LoRA


@pytest.mark.parametrize("drop, named", [(("model", "source"), "model.source"), (("basis",), "basis"),
                                         (("layers",), "layers"), (("basis", "recipe"), "basis.recipe")])
def test_a_missing_required_field_names_the_key_and_the_file(tmp_path, drop, named):
    folder = tmp_path / "broken"
    folder.mkdir()
    raw = _raw(SHIPPED / "acip.json")
    parent = raw
    for key in drop[:-1]:
        parent = parent[key]
    del parent[drop[-1]]
    (folder / "acip.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=rf"{folder / 'acip.json'} lacks the required field '{named}'"):
        load_artifact(folder)


@pytest.mark.skipif(not TUNED, reason="no tuned sizes shipped")
def test_a_shipped_tuned_json_parses_and_writes_back_as_read():
    for folder in TUNED:
        text = (folder / TUNED_FILE).read_text(encoding="utf-8")
        tuned = load_tuned(folder)
        assert json.dumps(tuned.meta.to_json(), indent=1) == text.rstrip("\n")  # (shipped with a final newline)
        assert tuned.meta.parent.path == "../.." and len(tuned.meta.parent.checksum) == 64
        assert tuned.meta.size.size_ratio == pytest.approx(float(folder.name), abs=1e-4)
        assert tuned.meta.target == float(folder.name) and tuned.format == "float32"
        assert tuned.meta.finetune["objective"] == "lm+kd"
        assert tuned.meta.perplexity["heldout"]["tuned"]["perplexity"] < tuned.meta.perplexity["heldout"]["untuned"]["perplexity"]


@pytest.mark.skipif(not TUNED, reason="no tuned sizes shipped")
def test_a_tuned_json_without_its_size_prefix_names_the_key_and_the_file(tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(TUNED[0], folder)
    raw = _raw(folder / TUNED_FILE)
    del raw["size"]["prefix"]
    (folder / TUNED_FILE).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=rf"{folder / TUNED_FILE} lacks the required field 'size.prefix'"):
        load_tuned(folder)
    assert TunedMeta.from_json(_raw(TUNED[0] / TUNED_FILE)).size.prefix > 0

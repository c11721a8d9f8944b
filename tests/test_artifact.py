import json
import os
import pickle
import shutil

import pytest
import torch

from acip_core import ArtifactError, load_artifact, save_artifact
from acip_core.sources.models import load_base
from acip_core.artifacts.open import any_size_from, open_artifact


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact, dst)
    return dst


def _edit_meta(folder, fn):
    meta = json.loads((folder / "acip.json").read_text())
    fn(meta)
    (folder / "acip.json").write_text(json.dumps(meta))


def test_round_trip_is_exact(tiny_artifact, tmp_path):
    art = load_artifact(tiny_artifact)
    save_artifact(tmp_path / "again", art)
    again = load_artifact(tmp_path / "again")
    assert again.meta.layers == art.meta.layers
    for n in art.scores:
        assert torch.equal(again.scores[n], art.scores[n])
    for n in art.adapters:
        assert torch.equal(again.adapters[n], art.adapters[n])
    assert again.curve.equals(art.curve)


def test_open_artifact_rebuilds_and_checks_the_basis(tiny_artifact):
    model = open_artifact(tiny_artifact)
    size = model.size_for_ratio(0.5)
    assert 0.5 <= size.size_ratio <= 0.51


def test_missing_folder_and_files(copy, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")
    (copy / "scores.safetensors").unlink()
    with pytest.raises(ArtifactError, match="scores.safetensors is missing"):
        load_artifact(copy)
    (copy / "acip.json").unlink()
    with pytest.raises(ArtifactError, match="acip.json is missing"):
        load_artifact(copy)


def test_truncated_file_is_named(copy):
    data = (copy / "adapters.safetensors").read_bytes()
    (copy / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="adapters.safetensors is corrupted or truncated"):
        load_artifact(copy)


def test_pickle_renamed_to_safetensors_is_refused_not_unpickled(copy):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    blob = pickle.dumps({"x": Boom()})
    (copy / "scores.safetensors").write_bytes(blob)
    _edit_meta(copy, lambda m: m["files"].update({"scores.safetensors": __import__("hashlib").sha256(blob).hexdigest()}))
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_artifact(copy)


def test_future_version_and_bad_json(copy):
    _edit_meta(copy, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="newer than this ACIP Studio"):
        load_artifact(copy)
    (copy / "acip.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(copy)


def test_nan_scores_and_wrong_shapes(copy):
    art = load_artifact(copy)
    name = next(iter(art.scores))
    art.scores[name] = torch.full_like(art.scores[name], float("nan"))
    save_artifact(copy, art)
    with pytest.raises(ArtifactError, match="NaN"):
        load_artifact(copy)
    art.scores[name] = torch.zeros(3)
    save_artifact(copy, art)
    with pytest.raises(ArtifactError, match="has shape"):
        load_artifact(copy)


def test_artifact_for_another_model_is_refused(tiny_artifact, tiny_qwen):
    art = load_artifact(tiny_artifact)
    model, tok = load_base(tiny_qwen)  # same shapes, other weights
    with pytest.raises(ArtifactError, match="fingerprint mismatch|do not match"):
        any_size_from(art, model, tok)


def test_unknown_model_offline_fails_at_once_with_advice():
    from acip_core import ModelSourceError

    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        load_base("someone/not-a-cached-model")
    with pytest.raises(ModelSourceError, match="unknown model"):
        load_base("no such model")


@pytest.mark.parametrize("edit", [
    lambda m: m.setdefault("baselines", {}).update(block_removal_order=["x"]),
    lambda m: m.update(targets=5),
    lambda m: m["basis"].update(check={"model.layers.0.self_attn.q_proj": 5}),
    lambda m: m.update(layers=[1, 2]),
    lambda m: m.update(lora="rank"),
])
def test_a_value_of_the_wrong_kind_is_an_artifact_error_and_listing_skips_it(copy, tiny_artifact, edit):
    """One folder with a malformed acip.json is named as broken; the artifact list goes on without it."""
    from acip_core.artifacts.artifact import problem
    from acip_core.serving.registry import find_artifacts

    _edit_meta(copy, edit)
    with pytest.raises(ArtifactError):
        load_artifact(copy)
    assert problem(copy)
    listed = [c[1] for c in find_artifacts([str(tiny_artifact), str(copy)])]
    assert str(tiny_artifact) in listed and str(copy) not in listed


@pytest.mark.parametrize("killed", ["before acip.json", "after acip.json"])
def test_a_curve_rewrite_killed_midway_leaves_a_loadable_artifact(copy, monkeypatch, killed):
    """curve.csv and acip.json (its checksum) were replaced one after the other: a kill between them left
    an artifact refused as corrupted. Now the new version waits beside the old one until acip.json names
    it: killed before, the old artifact loads whole; after, the load finishes the save."""
    import pandas as pd

    from acip_core.artifacts import artifact as art

    old = load_artifact(copy).curve
    new = pd.concat([old, old.tail(1).assign(size_ratio=0.123)], ignore_index=True)

    class Killed(Exception):
        pass

    if killed == "before acip.json":
        real = art.atomic_write_bytes

        def write(path, data):
            if path.name == art.META_FILE:
                raise Killed
            return real(path, data)
        monkeypatch.setattr(art, "atomic_write_bytes", write)
    else:
        real_replace = os.replace

        def replace(src, dst):  # killed as the first pending version is moved into place
            if str(src).endswith(art.PENDING):
                raise Killed
            return real_replace(src, dst)
        monkeypatch.setattr(art.os, "replace", replace)
    with pytest.raises(Killed):
        art.write_curve(copy, new)
    monkeypatch.undo()
    loaded = load_artifact(copy).curve
    want = old if killed == "before acip.json" else new
    assert len(loaded) == len(want) and list(loaded.size_ratio) == pytest.approx(list(want.size_ratio))
    if killed == "after acip.json":
        assert not list(copy.glob("*.new"))  # moved into place by the load
    art.write_curve(copy, new)  # and the next save goes through, leftovers gone
    assert len(load_artifact(copy).curve) == len(new) and not list(copy.glob("*.new"))

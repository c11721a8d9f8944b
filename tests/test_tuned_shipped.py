"""The tuned sizes shipped beside the artifact: valid, of this artifact, small (no model is loaded)."""

from pathlib import Path

import pytest

from acip_core.artifacts.artifact import load_artifact
from acip_core.artifacts.tuned import TUNED_DIR, check_parent, load_tuned, tuned_sizes

SHIPPED = Path(__file__).resolve().parent.parent / "precomputed" / "smollm2-135m-instruct"
FOLDERS = sorted((SHIPPED / TUNED_DIR).iterdir()) if (SHIPPED / TUNED_DIR).is_dir() else []


@pytest.mark.skipif(not FOLDERS, reason="no tuned sizes shipped")
def test_shipped_tuned_sizes_are_valid_small_and_listed():
    parent = load_artifact(SHIPPED)
    for folder in FOLDERS:
        tuned = load_tuned(folder)
        check_parent(tuned, parent)
        assert tuned.parent_folder == SHIPPED.resolve()
        assert (folder / "adapters.safetensors").stat().st_size < 25e6  # bf16, factorized layers only
        assert not list(folder.glob("checkpoint*")) and not (folder / ".lock").exists()
    listed = tuned_sizes(SHIPPED)
    assert [Path(d["folder"]).name for d in listed] == [f.name for f in sorted(FOLDERS, key=lambda f: load_tuned(f).size_ratio)]
    assert not (SHIPPED / TUNED_DIR / "acip.json").exists()  # never taken for an artifact

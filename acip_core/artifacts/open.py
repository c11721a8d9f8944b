"""One way to open what a scoring run left: an artifact folder, a tuned size's folder or a size of
either, as an AnySizeModel on its base model."""
from __future__ import annotations

from pathlib import Path

from acip_core.artifacts.artifact import Artifact, ArtifactError, load_artifact
from acip_core.artifacts.tuned import load_tuned, open_parent
from acip_core.engine.basis import basis_for, calibration_grams, verify_basis
from acip_core.engine.materialize import AnySizeModel
from acip_core.engine.parametrize import TargetError, target_linears
from acip_core.sources.models import fingerprint, load_base


def target_fingerprint(linears) -> str:
    return fingerprint({n: m.weight for n, m in linears.items()})


def open_artifact(folder: str | Path, on_progress=None) -> AnySizeModel:
    """Loads the artifact's base model, rebuilds (or reads the cached) basis, and checks both."""
    artifact = load_artifact(folder)
    model, tokenizer = load_base(artifact.meta["model"]["source"])
    return any_size_from(artifact, model, tokenizer, on_progress)


def any_size_from(artifact: Artifact, model, tokenizer, on_progress=None) -> AnySizeModel:
    linears = artifact_linears(artifact, model)
    shapes = {n: [m.out_features, m.in_features, m.bias is not None] for n, m in linears.items()}
    if shapes != artifact.meta["layers"]:
        raise ArtifactError(f"{artifact.path}: its layers do not match the model "
                            f"{artifact.meta['model']['source']!r} (an artifact for another model?)")
    fp = target_fingerprint(linears)
    if fp != artifact.meta["model"]["fingerprint"]:
        raise ArtifactError(f"{artifact.path} was scored on other weights than "
                            f"{artifact.meta['model']['source']!r} has now (fingerprint mismatch)")
    basis = basis_for(model, tokenizer, linears, artifact.meta["basis"]["recipe"], fp, on_progress)
    try:
        verify_basis(basis, artifact.meta["basis"]["check"])
    except ValueError as err:
        raise ArtifactError(f"{artifact.path}: {err}") from None
    lora = artifact.meta.get("lora", {})
    return AnySizeModel(model, tokenizer, basis, artifact.scores, artifact.adapters,
                        int(lora.get("rank", 0)), float(lora.get("alpha", 16.0)), meta=artifact.meta,
                        calibration=calibration_for(model, tokenizer, linears, artifact.meta["basis"]["recipe"]),
                        size_rule=artifact.size_rule)


def artifact_linears(artifact: Artifact, model) -> dict:
    """The artifact's target layers on `model`: exactly the FQNs of its `layers` (whichever rule chose
    them when it was scored), as nn.Linear."""
    try:
        return target_linears(model, list(artifact.meta["layers"]))
    except TargetError as err:
        raise ArtifactError(f"{artifact.path}: {err} (an artifact for another model?)") from None


def calibration_for(model, tokenizer, linears, recipe: dict):
    """The int4 quantizer's Grams, measured on first use from the basis' own calibration text (a
    recipe without text, the plain SVD, gives none: int4 then rounds to nearest)."""
    if "data" not in recipe:
        return None
    return lambda: calibration_grams(model, tokenizer, linears, recipe)


def open_tuned(folder: str | Path):
    """A tuned size's folder as (AnySizeModel carrying the tuned LoRA, its Size); parent checked."""
    tuned = load_tuned(folder)
    parent = open_parent(tuned)
    model, tokenizer = load_base(parent.meta["model"]["source"])
    adapters = dict(parent.adapters, **{k: v.float() for k, v in tuned.adapters.items()})
    parent.adapters = adapters  # layers dense at this size keep the parent's LoRA, never run
    parent.meta = dict(parent.meta, tuned=dict(folder=str(folder), format=tuned.format, parent=str(parent.path),
                                               **{k: tuned.meta.get(k, {}) for k in ("size", "finetune", "perplexity")}))
    any_size = any_size_from(parent, model, tokenizer)
    size = any_size.size_at(int(tuned.meta["size"]["prefix"]))
    if abs(size.size_ratio - tuned.size_ratio) > 1e-4:
        raise ArtifactError(f"{folder}: its size prefix gives size_ratio {size.size_ratio:.5f}, "
                            f"not the recorded {tuned.size_ratio:.5f}")
    return any_size, size



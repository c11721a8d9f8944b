"""The one way to open a folder a scoring run left: an artifact, or a tuned size (its parent artifact
carrying the tuned LoRA), as an AnySizeModel on its base model. Every command, the app and fine-tuning
open folders through open_folder; evaluation.baselines passes a `build` for its methods."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from acip_core.artifacts.artifact import Artifact, ArtifactError, load_artifact
from acip_core.artifacts.meta import TunedFrom
from acip_core.artifacts.tuned import TunedSize, is_tuned, load_tuned, open_parent
from acip_core.engine.basis import basis_for, calibration_grams, verify_basis
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.engine.parametrize import TargetError, target_linears
from acip_core.sources.models import fingerprint, load_base


def target_fingerprint(linears) -> str:
    return fingerprint({n: m.weight for n, m in linears.items()})


@dataclass
class Opened:
    """What open_folder opened: the any-size model; the artifact it was built from (for a tuned size,
    its parent with the tuned LoRA); for a tuned size its TunedSize and its own Size."""
    any_size: AnySizeModel
    artifact: Artifact
    tuned: TunedSize | None = None
    size: Size | None = None


def open_folder(folder: str | Path, on_progress=None, build=None) -> Opened:
    """Opens an artifact folder or a tuned size's folder: validates it (a tuned size: its parent's
    checksum too), loads the base model its acip.json names (the one place a folder's base model is
    loaded) and builds the any-size model with `build(artifact, model, tokenizer, on_progress)`
    (default any_size_from: ACIP's own sizes, basis rebuilt or read from its cache and checked)."""
    tuned = load_tuned(folder) if is_tuned(folder) else None
    artifact = with_tuned(open_parent(tuned), tuned) if tuned else load_artifact(folder)
    model, tokenizer = load_base(artifact.meta.model.source)
    any_size = (build or any_size_from)(artifact, model, tokenizer, on_progress)
    return Opened(any_size, artifact, tuned, _tuned_size(any_size, tuned) if tuned else None)


def open_artifact(folder: str | Path, on_progress=None) -> AnySizeModel:
    """The package's verb: open_folder's any-size model."""
    return open_folder(folder, on_progress).any_size


def with_tuned(parent: Artifact, tuned: TunedSize) -> Artifact:
    """The parent artifact carrying a tuned size's LoRA (layers dense at that size keep the parent's,
    never run) and, in meta.tuned, what its tuned.json says (the export's card names it)."""
    adapters = dict(parent.adapters, **{k: v.float() for k, v in tuned.adapters.items()})
    info = TunedFrom(folder=str(tuned.path), format=tuned.format, parent=str(parent.path), size=tuned.meta.size,
                     finetune=tuned.meta.finetune, perplexity=tuned.meta.perplexity)
    return replace(parent, adapters=adapters, meta=replace(parent.meta, tuned=info))


def _tuned_size(any_size: AnySizeModel, tuned: TunedSize) -> Size:
    size = any_size.size_at(tuned.meta.size.prefix)
    if abs(size.size_ratio - tuned.size_ratio) > 1e-4:
        raise ArtifactError(f"{tuned.path}: its size prefix gives size_ratio {size.size_ratio:.5f}, "
                            f"not the recorded {tuned.size_ratio:.5f}")
    return size


def any_size_from(artifact: Artifact, model, tokenizer, on_progress=None) -> AnySizeModel:
    """ACIP's any-size model of `artifact` on its loaded base model, after checking that the model's
    layers and weights are the ones it was scored on and that the basis reproduces."""
    meta = artifact.meta
    linears = artifact_linears(artifact, model)
    shapes = {n: [m.out_features, m.in_features, m.bias is not None] for n, m in linears.items()}
    if shapes != meta.layers:
        raise ArtifactError(f"{artifact.path}: its layers do not match the model "
                            f"{meta.model.source!r} (an artifact for another model?)")
    fp = target_fingerprint(linears)
    if fp != meta.model.fingerprint:
        raise ArtifactError(f"{artifact.path} was scored on other weights than "
                            f"{meta.model.source!r} has now (fingerprint mismatch)")
    basis = basis_for(model, tokenizer, linears, meta.basis.recipe, fp, on_progress)
    try:
        verify_basis(basis, meta.basis.check)
    except ValueError as err:
        raise ArtifactError(f"{artifact.path}: {err}") from None
    return AnySizeModel(model, tokenizer, basis, artifact.scores, artifact.adapters,
                        artifact.lora_rank, meta.lora.alpha, meta=meta,
                        calibration=calibration_for(model, tokenizer, linears, meta.basis.recipe),
                        size_rule=artifact.size_rule)


def artifact_linears(artifact: Artifact, model) -> dict:
    """The artifact's target layers on `model`: exactly the FQNs of its `layers` (whichever rule chose
    them when it was scored), as nn.Linear."""
    try:
        return target_linears(model, list(artifact.meta.layers))
    except TargetError as err:
        raise ArtifactError(f"{artifact.path}: {err} (an artifact for another model?)") from None


def calibration_for(model, tokenizer, linears, recipe: dict):
    """The int4 quantizer's Grams, measured on first use from the basis' own calibration text (a
    recipe without text, the plain SVD, gives none: int4 then rounds to nearest)."""
    if "data" not in recipe:
        return None
    return lambda: calibration_grams(model, tokenizer, linears, recipe)

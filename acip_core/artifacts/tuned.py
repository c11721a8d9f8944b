"""A tuned size (paper §3.3): one size of an artifact with its own fine-tuned LoRA, as a small folder.

tuned.json holds the format version; the parent artifact (its folder, relative to this one where
possible, and its checksum); the size (its prefix in the parent's global order, size_ratio, params);
the format its frozen factors were held in while it trained (float32, int8, int4-g32, …: the format
it is served in by default); how it was tuned (objective, steps, data, …); what it measured
(perplexity of the untuned and the tuned size per eval set, as served, wall time, peak RSS); and the sha256 of adapters.safetensors. That file
holds LoRA A/B in bfloat16 for the layers that are factorized at this size (a dense layer runs the
original weight without LoRA, App. D.3, so it has nothing to tune). The name tuned.json (not
acip.json) keeps a tuned size from being taken for a whole artifact. Opening one validates its
files and refuses a parent whose checksum differs: the adapters only fit the factors they were
trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from acip_core.artifacts.artifact import ADAPTERS_FILE, Artifact, ArtifactError, _sha, atomic_write_bytes, load_artifact
from acip_core.artifacts.meta import ArtifactMeta, TunedMeta, check_version, read_json
from acip_core.formats.registry import parse_format

TUNED_FILE = "tuned.json"
TUNED_FORMAT = 1
TUNED_DIR = "tuned"  # <parent>/tuned/<size>/: where a parent's shipped tuned sizes live


@dataclass
class TunedSize:
    meta: TunedMeta  # tuned.json, typed
    adapters: dict[str, torch.Tensor]  # fqn.lora_A / fqn.lora_B of the factorized layers
    path: Path

    @property
    def size_ratio(self) -> float:
        return self.meta.size.size_ratio

    @property
    def format(self) -> str:
        """The format it was tuned in (a Format key; float32 for sizes tuned before formats)."""
        return self.meta.format

    @property
    def parent_folder(self) -> Path:
        """The recorded parent; for a size copied into an artifact's tuned/ folder (how sizes are
        shipped), the artifact it sits in. Either way check_parent verifies the checksum."""
        recorded = (self.path / self.meta.parent.path).resolve()
        home = self.path.resolve().parent
        if not (recorded / "acip.json").is_file() and home.name == TUNED_DIR and (home.parent / "acip.json").is_file():
            return home.parent
        return recorded


def is_tuned(folder: str | Path) -> bool:
    return (Path(folder) / TUNED_FILE).is_file()


def parent_checksum(artifact: "Artifact | ArtifactMeta") -> str:
    """What a tuned size depends on: the base weights, basis, score map and scoring LoRA of its parent
    (an Artifact, or its acip.json's ArtifactMeta: the digests are in it, no tensor file is read).

    (Not acip.json's own hash: re-measuring the parent's curve rewrites acip.json, not the factors.)
    """
    m = artifact if isinstance(artifact, ArtifactMeta) else artifact.meta
    key = dict(model=m.model.fingerprint, basis=m.basis.to_json(), lora=m.lora.to_json() or None,
               scores=m.files.get("scores.safetensors"), adapters=m.files.get(ADAPTERS_FILE))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def parent_reference(parent_folder: Path, tuned_folder: Path) -> str:
    """The parent's folder as tuned.json records it: relative to the tuned folder when possible."""
    parent, tuned = Path(parent_folder).resolve(), Path(tuned_folder).resolve()
    try:
        return os.path.relpath(parent, tuned)
    except ValueError:  # another drive (Windows)
        return str(parent)


def save_tuned(folder: str | Path, meta: dict, adapters: dict[str, torch.Tensor]) -> Path:
    """Writes adapters.safetensors (bf16) then tuned.json with its checksum, both atomically."""
    folder = Path(folder)
    blob = save({k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in adapters.items()})
    atomic_write_bytes(folder / ADAPTERS_FILE, blob)
    meta = dict(meta, format_version=TUNED_FORMAT, kind="tuned-size", files={ADAPTERS_FILE: _sha(blob)})
    atomic_write_bytes(folder / TUNED_FILE, json.dumps(meta, indent=1).encode())
    return folder


def load_tuned(folder: str | Path) -> TunedSize:
    """Reads and validates a tuned size's own files (the parent is checked by check_parent)."""
    folder = Path(folder)
    path = folder / TUNED_FILE
    raw = read_json(path, "a tuned size")
    check_version(raw, str(path), TUNED_FORMAT)
    meta = TunedMeta.from_json(raw, str(path))
    digest = meta.files.get(ADAPTERS_FILE)
    if not isinstance(digest, str):
        raise ArtifactError(f"{path} lacks the required field 'files.{ADAPTERS_FILE}'")
    if meta.size.prefix < 0 or not 0.0 < meta.size.size_ratio <= 1.0 or not meta.parent.path or not meta.parent.checksum:
        raise ArtifactError(f"{path}: size or parent out of range")
    try:
        parse_format(meta.format)
    except ValueError as err:
        raise ArtifactError(f"{path}: {err}") from None
    blob_path = folder / ADAPTERS_FILE
    if not blob_path.is_file():
        raise ArtifactError(f"{blob_path} is missing")
    blob = blob_path.read_bytes()
    if _sha(blob) != digest:
        raise ArtifactError(f"{blob_path} is corrupted or truncated (its sha256 does not match {TUNED_FILE})")
    try:
        adapters = load(blob)
    except Exception as err:
        raise ArtifactError(f"{blob_path} is not a valid safetensors file ({str(err)[:120]})") from None
    return TunedSize(meta, adapters, folder)


def check_parent(tuned: TunedSize, parent: Artifact) -> None:
    """Raises ArtifactError unless `parent` is the artifact the size was tuned on and the adapters fit."""
    found, expected = parent_checksum(parent), tuned.meta.parent.checksum
    if found != expected:
        raise ArtifactError(f"{tuned.path} was tuned on another artifact than {parent.path} (parent "
                            f"checksum {found[:12]}…, expected {expected[:12]}…): use the artifact it was "
                            "tuned on, or tune this one again")
    rank = parent.lora_rank
    shapes = parent.shapes
    for key, t in tuned.adapters.items():
        name, _, part = key.rpartition(".")
        if name not in shapes or part not in ("lora_A", "lora_B"):
            raise ArtifactError(f"{tuned.path / ADAPTERS_FILE}: {key} is not a LoRA of the parent's layers")
        sh = shapes[name]
        want = (rank, sh.in_features) if part == "lora_A" else (sh.out_features, rank)
        if tuple(t.shape) != want or not torch.isfinite(t.float()).all():
            raise ArtifactError(f"{tuned.path / ADAPTERS_FILE}: {key} has shape {tuple(t.shape)} "
                                f"(expected {want}) or non-finite values")


def open_parent(tuned: TunedSize) -> Artifact:
    parent = load_artifact(tuned.parent_folder)
    check_parent(tuned, parent)
    return parent


def tuned_sizes(parent_folder: str | Path, extra_folders=()) -> list[dict]:
    """The tuned sizes of an artifact (under <parent>/tuned/, and any of `extra_folders` tuned on
    it), smallest first: dict(folder, size_ratio, format, objective, steps, perplexity). For the app's
    lists and curve, called on every refresh: reads the JSON files only (opening a tuned size
    validates everything, load_tuned and check_parent)."""
    checksum = parent_checksum(ArtifactMeta.from_json(json.loads(
        (Path(parent_folder) / "acip.json").read_text(encoding="utf-8")), str(Path(parent_folder) / "acip.json")))
    root = Path(parent_folder) / TUNED_DIR
    candidates = sorted(root.iterdir()) if root.is_dir() else []
    found = []
    for folder in list(candidates) + [Path(f) for f in extra_folders]:
        try:
            meta = TunedMeta.from_json(json.loads((folder / TUNED_FILE).read_text(encoding="utf-8")),
                                       str(folder / TUNED_FILE))
            if meta.parent.checksum != checksum:
                continue
            found.append(dict(folder=str(folder), size_ratio=meta.size.size_ratio, format=meta.format,
                              objective=str(meta.finetune.get("objective")), steps=meta.finetune.get("steps"),
                              perplexity=meta.perplexity))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # (ArtifactError is a ValueError)
            continue  # not a tuned size (or a broken one): listing never fails on it
    return sorted(found, key=lambda d: d["size_ratio"])


def tuned_label(parent_name: str, t: dict) -> str:
    """How a tuned size is named in the app: its parent, size, format and how it was tuned."""
    return f"{parent_name} · tuned {t['size_ratio']:.2f} {t['format']} ({t['objective']}, {t['steps']} steps)"

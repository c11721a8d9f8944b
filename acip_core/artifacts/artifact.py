"""The precomputed artifact: read, write, validate. Safetensors, JSON and CSV only; never pickle.

A folder holds acip.json (recipe, shapes, checksums), scores.safetensors (one fp32 score vector per
target layer), adapters.safetensors (LoRA A/B per layer) and curve.csv (the trade-off curve).
Every file is written atomically (temp file + rename) and acip.json, written last, records the
sha256 of the others: a crash or a truncated copy is detected on load and named in the error.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load, save

from acip_core.artifacts.meta import FORMAT_VERSION, ArtifactError, ArtifactMeta, check_version, read_json
from acip_core.engine.prune import SIZE_RULES, LayerShape

__all__ = ["FORMAT_VERSION", "ArtifactError", "ArtifactMeta", "Artifact", "save_artifact", "load_artifact",
           "write_curve", "problem", "atomic_file", "atomic_write_bytes"]
META_FILE, SCORES_FILE, ADAPTERS_FILE, CURVE_FILE = ("acip.json", "scores.safetensors",
                                                     "adapters.safetensors", "curve.csv")


_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a file name in the folder, never a path


@dataclass
class Artifact:
    meta: ArtifactMeta  # acip.json, typed (a dict given here is parsed: how a run builds its artifact)
    scores: dict[str, torch.Tensor]  # fqn -> [k] fp32
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)  # fqn.lora_A / fqn.lora_B
    curve: pd.DataFrame | None = None
    path: Path | None = None

    def __post_init__(self):
        if not isinstance(self.meta, ArtifactMeta):
            where = self.path / META_FILE if self.path else "the artifact's metadata"
            self.meta = ArtifactMeta.from_json(self.meta, str(where))

    @property
    def shapes(self) -> dict[str, LayerShape]:
        return self.meta.shapes

    @property
    def size_rule(self) -> str:
        """How a ratio becomes ranks and which layers may run dense (prune.SIZE_RULES); an imported
        official checkpoint records "official", our own artifacts have none: the default."""
        return self.meta.size_rule

    @property
    def lora_rank(self) -> int:
        """The rank of the LoRA the adapters hold (0 without adapters): what every size runs with."""
        return self.meta.lora.rank if self.adapters else 0


@contextmanager
def atomic_file(path: Path):
    """Yields an open binary file beside `path`; on success it is fsynced and renamed over `path`.

    A crash at any point leaves either the old file or the complete new one, never a half-file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users (a container's uid) must read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PENDING = ".new"  # a file's next version, written before acip.json names it (save_artifact)


def save_artifact(folder: str | Path, artifact: Artifact) -> Path:
    """Writes the artifact's files so that a kill at any moment leaves a loadable artifact: each file's
    new version beside it (`<name>.new`, atomically), then acip.json with their checksums, then each
    moved into place. Killed before acip.json: the old artifact, whole; after it: load_artifact moves
    the pending versions in (their checksums are the ones acip.json names)."""
    folder = Path(folder)
    blobs = {SCORES_FILE: save({k: v.detach().float().contiguous().cpu() for k, v in artifact.scores.items()}),
             ADAPTERS_FILE: save({k: v.detach().float().contiguous().cpu() for k, v in artifact.adapters.items()})}
    if artifact.curve is not None:
        blobs[CURVE_FILE] = artifact.curve.to_csv(index=False).encode()
    changed = [name for name, data in blobs.items()
               if not (folder / name).is_file() or _sha((folder / name).read_bytes()) != _sha(data)]
    for name in blobs:
        if name in changed:
            atomic_write_bytes(folder / (name + PENDING), blobs[name])
        else:  # a leftover of a save killed before its acip.json: never named, never needed
            (folder / (name + PENDING)).unlink(missing_ok=True)
    meta = replace(artifact.meta, format_version=FORMAT_VERSION,
                   files={name: _sha(data) for name, data in blobs.items()})
    atomic_write_bytes(folder / META_FILE, json.dumps(meta.to_json(), indent=1).encode())
    for name in changed:
        os.replace(folder / (name + PENDING), folder / name)
    artifact.meta, artifact.path = meta, folder
    return folder


def write_curve(folder: str | Path, curve: pd.DataFrame) -> None:
    """Replaces curve.csv of an existing artifact (and its checksum)."""
    artifact = load_artifact(folder)
    artifact.curve = curve
    save_artifact(folder, artifact)


def load_artifact(folder: str | Path) -> Artifact:
    """Reads and validates an artifact folder; raises ArtifactError naming what is wrong (a value of
    the wrong kind anywhere in acip.json too: one broken folder must not break listing the others)."""
    try:
        return _read_artifact(Path(folder))
    except ArtifactError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise ArtifactError(f"{Path(folder) / META_FILE} is malformed ({type(err).__name__}: "
                            f"{str(err)[:200]})") from None


def _read_artifact(folder: Path) -> Artifact:
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    meta_path = folder / META_FILE
    raw = read_json(meta_path, "an ACIP artifact (or a run that never finished)")
    check_version(raw, str(meta_path), FORMAT_VERSION)
    files = raw.get("files")  # checked first: what is read from the folder is named here
    if not isinstance(files, dict):
        raise ArtifactError(f"{meta_path}: 'files' must map file names to sha256 digests, "
                            f"got {type(files).__name__}")
    meta = ArtifactMeta.from_json(raw, str(meta_path), stored=True)
    blobs = {}
    for name, digest in files.items():
        # plain names of files inside the folder: a path ('../../etc/passwd') is never read
        if not isinstance(name, str) or not _PLAIN.match(name) or not isinstance(digest, str):
            raise ArtifactError(f"{meta_path}: 'files' lists {name!r}; it must map plain file names "
                                "in the folder (like scores.safetensors) to sha256 digests")
        path = folder / name
        pending = folder / (name + PENDING)
        if pending.is_file() and _sha(pending.read_bytes()) == digest:  # a save killed after acip.json
            try:
                os.replace(pending, path)  # finished here (save_artifact)
            except OSError:
                pass  # a read-only folder: read below as it is
        if not path.is_file():
            raise ArtifactError(f"{path} is missing")
        blobs[name] = path.read_bytes()
        if _sha(blobs[name]) != digest:
            raise ArtifactError(f"{path} is corrupted or truncated (its sha256 does not match acip.json)")
    for required in (SCORES_FILE, ADAPTERS_FILE):
        if required not in blobs:
            raise ArtifactError(f"{folder / required} is not listed in acip.json")
    scores = _tensors(folder / SCORES_FILE, blobs[SCORES_FILE])
    adapters = _tensors(folder / ADAPTERS_FILE, blobs[ADAPTERS_FILE])
    curve = None
    if CURVE_FILE in blobs:
        try:
            curve = pd.read_csv(io.BytesIO(blobs[CURVE_FILE]))
        except Exception as err:
            raise ArtifactError(f"{folder / CURVE_FILE} is not a readable CSV ({err})") from None
        if not {"method", "size_ratio"} <= set(curve.columns):
            raise ArtifactError(f"{folder / CURVE_FILE} lacks the columns method and size_ratio")
    artifact = Artifact(meta, scores, adapters, curve, folder)
    _check_shapes(artifact, folder)
    return artifact


def _tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except Exception as err:
        raise ArtifactError(f"{path} is not a valid safetensors file ({str(err)[:120]}); "
                            "pickled files are never loaded") from None


def _check_shapes(artifact: Artifact, folder: Path) -> None:
    try:
        shapes = artifact.shapes
    except TypeError:
        raise ArtifactError(f"{folder / META_FILE}: 'layers' must map names to [out, in, bias]") from None
    if set(artifact.scores) != set(shapes):
        diff = sorted(set(artifact.scores) ^ set(shapes))[:3]
        raise ArtifactError(f"{folder / SCORES_FILE} names other layers than acip.json (e.g. {diff})")
    for name, shape in shapes.items():
        s = artifact.scores[name]
        if tuple(s.shape) != (shape.full_rank,):
            raise ArtifactError(f"{folder / SCORES_FILE}: {name} has shape {tuple(s.shape)}, "
                                f"expected ({shape.full_rank},)")
        if not torch.isfinite(s).all():
            raise ArtifactError(f"{folder / SCORES_FILE}: {name} contains NaN or infinite scores")
    rank = artifact.lora_rank
    if artifact.adapters:
        for name, shape in shapes.items():
            for key, expected in ((f"{name}.lora_A", (rank, shape.in_features)),
                                  (f"{name}.lora_B", (shape.out_features, rank))):
                t = artifact.adapters.get(key)
                if t is None:
                    raise ArtifactError(f"{folder / ADAPTERS_FILE} lacks {key}")
                if tuple(t.shape) != expected:
                    raise ArtifactError(f"{folder / ADAPTERS_FILE}: {key} has shape {tuple(t.shape)}, "
                                        f"expected {expected}")
                if not torch.isfinite(t).all():
                    raise ArtifactError(f"{folder / ADAPTERS_FILE}: {key} contains NaN or infinity")
    if artifact.size_rule not in SIZE_RULES:
        raise ArtifactError(f"{folder / META_FILE}: unknown size_rule {artifact.size_rule!r} "
                            f"(known: {', '.join(SIZE_RULES)}); a newer ACIP Studio wrote it?")
    if not all(isinstance(v, (int, float)) and math.isfinite(v)
               for pair in artifact.meta.basis.check.values() for v in pair):
        raise ArtifactError(f"{folder / META_FILE}: basis check values must be finite numbers")


_CHECKED: dict[str, tuple[tuple, str | None]] = {}


def problem(folder: str | Path) -> str | None:
    """Why `folder` is not a usable artifact (load_artifact's message), or None when it is. Remembered
    per folder until one of its files changes, so listing artifacts every few seconds costs a stat."""
    folder = Path(folder)
    try:
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir())
                      if p.is_file())
    except OSError as err:
        return f"{folder} cannot be read ({err.strerror})"
    key = str(folder.resolve())
    cached = _CHECKED.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        load_artifact(folder)
        found = None
    except ArtifactError as err:
        found = str(err)
    if len(_CHECKED) > 1024:
        _CHECKED.clear()
    _CHECKED[key] = (stamp, found)
    return found

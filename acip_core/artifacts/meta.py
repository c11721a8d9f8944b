"""acip.json and tuned.json as typed records, parsed once when a folder is read.

Each record names the fields the library reads; every other key (a field an older or newer version
wrote, the scoring settings' details, the run's memory figures) is kept as read and written back in
its place, so `save_artifact` writes the same JSON it loaded. A field that is required and missing
raises ArtifactError naming the key and the file.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from acip_core.engine.prune import DEFAULT_SIZE_RULE, LayerShape

FORMAT_VERSION = 1  # acip.json's format_version this version writes and reads


class ArtifactError(ValueError):
    """An artifact that cannot be used; the message names the file and the problem."""


_MISSING = object()


def read_json(path: Path, what: str, error: type[Exception] = ArtifactError) -> Any:
    """The JSON of a folder's metadata file; `error` names the file when it is missing ("not `what`")
    or is not JSON (acip.json, tuned.json, an official checkpoint's config.json)."""
    if not path.is_file():
        raise error(f"{path} is missing: not {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err})") from None


def _get(raw: Mapping, key: str, where: str, path: str = "", kind=None, default=_MISSING):
    """raw[key], or `default`; without a default a missing key (or one of another type) is an
    ArtifactError that names `path.key` and the file `where`."""
    name = f"{path}.{key}" if path else key
    if not isinstance(raw, Mapping):
        raise ArtifactError(f"{where}: {path or 'the file'} must be a JSON object, got {type(raw).__name__}")
    if key not in raw or raw[key] is None:
        if default is _MISSING:
            raise ArtifactError(f"{where} lacks the required field {name!r}")
        return default
    value = raw[key]
    if kind is dict:  # a JSON object is taken as it is, never converted
        if not isinstance(value, Mapping):
            raise ArtifactError(f"{where}: {name!r} must be a JSON object, got {type(value).__name__}")
        return value
    if kind is not None:
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ArtifactError(f"{where}: {name!r} is {value!r}, not a {kind.__name__}") from None
    return value


def check_version(raw: Any, where: str, newest: int) -> int:
    """The file's integer format_version; ArtifactError when it has none or is newer than `newest`."""
    version = raw.get("format_version") if isinstance(raw, Mapping) else None
    if not isinstance(version, int):
        raise ArtifactError(f"{where} has no integer format_version")
    if version > newest:
        raise ArtifactError(f"{where} is format version {version}, newer than this ACIP Studio "
                            f"understands ({newest}): upgrade acip-studio")
    return version


@dataclass(frozen=True)
class _Record:
    """A JSON object: the typed fields of the subclass and `raw`, the object as read (its other keys)."""
    raw: Mapping = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    _always = ()  # fields written even when absent when read and at their default

    def to_json(self) -> dict:
        """The object to write: the keys as read, in their order, with the typed fields' values (a
        field absent when read and still at its default stays absent; a value equal to the one read,
        12 for 12.0, is written as read)."""
        out = dict(self.raw)
        for f in fields(self):
            if f.name == "raw":
                continue
            value = _json_value(getattr(self, f.name))
            if f.name in self.raw and self.raw[f.name] == value:
                continue
            if f.name not in self.raw and f.name not in self._always and (
                    value in (None, {}, []) or value == _json_value(_default_of(f))):
                continue
            out[f.name] = value
        return out

    @property
    def extra(self) -> dict:
        """The keys this version does not type (kept and written back unchanged)."""
        named = {f.name for f in fields(self)}
        return {k: v for k, v in self.raw.items() if k not in named}


def _default_of(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _json_value(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_json()
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ModelInfo(_Record):
    """The base model: where it is loaded from and the sha256 of its target layers' weights."""
    source: str
    fingerprint: str | None = None
    architecture: str | None = None
    model_type: str | None = None

    @classmethod
    def from_json(cls, raw: Mapping, where: str) -> "ModelInfo":
        return cls(str(_get(raw, "source", where, "model")), _get(raw, "fingerprint", where, "model", str, None),
                   _get(raw, "architecture", where, "model", str, None),
                   _get(raw, "model_type", where, "model", str, None), raw=raw)


@dataclass(frozen=True)
class BasisInfo(_Record):
    """How the basis is rebuilt (engine.basis recipe) and the figures that check it."""
    recipe: dict
    check: dict = field(default_factory=dict)  # fqn -> [total, top] singular-value sums

    @classmethod
    def from_json(cls, raw: Mapping, where: str) -> "BasisInfo":
        return cls(_get(raw, "recipe", where, "basis", dict), _get(raw, "check", where, "basis", dict, {}), raw=raw)


@dataclass(frozen=True)
class LoraInfo(_Record):
    """The LoRA trained beside the masks (rank 0: none)."""
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0

    @classmethod
    def from_json(cls, raw: Mapping, where: str) -> "LoraInfo":
        return cls(_get(raw, "rank", where, "lora", int, 0), _get(raw, "alpha", where, "lora", float, 16.0),
                   _get(raw, "dropout", where, "lora", float, 0.0), raw=raw)


@dataclass(frozen=True)
class ResultInfo(_Record):
    """What the scoring run (or the import) reached; its memory figures stay in `extra`."""
    steps: int | None = None
    size_ratio_reached: float | None = None
    stopped_by: str | None = None
    seconds: float | None = None
    imported: bool = False  # an official checkpoint converted, not scored here

    @classmethod
    def from_json(cls, raw: Mapping, where: str) -> "ResultInfo":
        return cls(_get(raw, "steps", where, "result", int, None),
                   _get(raw, "size_ratio_reached", where, "result", float, None),
                   _get(raw, "stopped_by", where, "result", str, None), _get(raw, "seconds", where, "result", float, None),
                   bool(_get(raw, "imported", where, "result", default=False)), raw=raw)


@dataclass(frozen=True)
class OfficialInfo(_Record):
    """What an imported official ACIP checkpoint adds (artifacts.official)."""
    source: str
    storage: str | None = None
    size_ratio: float | None = None
    factor_error: float | None = None
    bytes: dict = field(default_factory=dict)  # the checkpoint's file name -> size

    @classmethod
    def from_json(cls, raw: Mapping, where: str) -> "OfficialInfo":
        return cls(str(_get(raw, "source", where, "official")), _get(raw, "storage", where, "official", str, None),
                   _get(raw, "size_ratio", where, "official", float, None),
                   _get(raw, "factor_error", where, "official", float, None),
                   _get(raw, "bytes", where, "official", dict, {}), raw=raw)


@dataclass(frozen=True)
class TunedFrom(_Record):
    """Set in memory when a tuned size is opened (never written to acip.json): the tuned size's folder,
    the format it was tuned in, its parent artifact and what its tuned.json says."""
    folder: str
    format: str
    parent: str
    size: "TunedSizeInfo"
    finetune: dict = field(default_factory=dict)
    perplexity: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactMeta(_Record):
    """acip.json (artifact.py) as typed fields."""
    _always = ("format_version", "files")
    model: ModelInfo
    layers: dict  # fqn -> [out_features, in_features, has_bias]: the target layers, in order
    basis: BasisInfo
    format_version: int = FORMAT_VERSION
    targets: tuple = ()  # leaf names the layers were chosen by
    targets_chosen_by: str | None = None
    lora: LoraInfo = LoraInfo()
    size_rule: str = DEFAULT_SIZE_RULE  # prune.SIZE_RULES; only an imported official checkpoint records one
    scoring: dict = field(default_factory=dict)  # the ScoringConfig it was scored with, as written
    result: ResultInfo = ResultInfo()
    files: dict = field(default_factory=dict)  # file name -> sha256
    block_removal_order: tuple | None = None  # baselines' stored order (in "baselines")
    official: OfficialInfo | None = None
    created: str | None = None
    versions: dict = field(default_factory=dict)
    tuned: TunedFrom | None = None

    @classmethod
    def from_json(cls, raw: Mapping, where: str = "acip.json", stored: bool = False) -> "ArtifactMeta":
        """`stored`: read from a folder, where the checksums of the files (`files`) are required too."""
        g = lambda key, kind=None, default=_MISSING: _get(raw, key, where, "", kind, default)  # noqa: E731
        official = g("official", default=None)
        order = _get(g("baselines", dict, {}), "block_removal_order", where, "baselines", default=None)
        return cls(ModelInfo.from_json(g("model"), where), g("layers", dict), BasisInfo.from_json(g("basis"), where),
                   g("format_version", int, FORMAT_VERSION), tuple(g("targets", default=())),
                   g("targets_chosen_by", str, None), LoraInfo.from_json(g("lora", default={}), where),
                   g("size_rule", str, DEFAULT_SIZE_RULE), g("scoring", dict, {}),
                   ResultInfo.from_json(g("result", default={}), where), g("files") if stored else g("files", default={}),
                   None if order is None else tuple(int(i) for i in order),
                   None if official is None else OfficialInfo.from_json(official, where),
                   g("created", str, None), g("versions", dict, {}), raw=raw)

    def to_json(self) -> dict:
        out = super().to_json()
        out.pop("tuned", None)  # the opened tuned size is no part of the artifact
        order = out.pop("block_removal_order", None)
        if order is not None or "baselines" in self.raw:
            baselines = dict(self.raw.get("baselines") or {})
            if order is not None:
                baselines["block_removal_order"] = list(order)
            out["baselines"] = baselines
        return out

    @property
    def shapes(self) -> dict[str, LayerShape]:
        return {n: LayerShape(*v) for n, v in self.layers.items()}


@dataclass(frozen=True)
class ParentRef(_Record):
    """A tuned size's parent artifact: its folder (relative to the tuned one where possible), the
    checksum of what the size depends on (tuned.parent_checksum) and its base model."""
    path: str
    checksum: str
    source: str | None = None

    @classmethod
    def from_json(cls, raw: Mapping, where: str) -> "ParentRef":
        return cls(str(_get(raw, "path", where, "parent")), str(_get(raw, "checksum", where, "parent")),
                   _get(raw, "source", where, "parent", str, None), raw=raw)


@dataclass(frozen=True)
class TunedSizeInfo(_Record):
    """The size tuned: its prefix in the parent's global order, size_ratio, params, the ratio asked for."""
    prefix: int
    size_ratio: float
    params: int | None = None
    target: float | None = None
    tuned_layers: int | None = None

    @classmethod
    def from_json(cls, raw: Mapping, where: str) -> "TunedSizeInfo":
        return cls(_get(raw, "prefix", where, "size", int), _get(raw, "size_ratio", where, "size", float),
                   _get(raw, "params", where, "size", int, None), _get(raw, "target", where, "size", float, None),
                   _get(raw, "tuned_layers", where, "size", int, None), raw=raw)


@dataclass(frozen=True)
class TunedMeta(_Record):
    """tuned.json (tuned.py) as typed fields."""
    _always = ("format_version", "files")
    parent: ParentRef
    size: TunedSizeInfo
    files: dict
    format_version: int
    format: str = "float32"  # the format it was tuned in (sizes tuned before formats: float32)
    finetune: dict = field(default_factory=dict)  # the FinetuneConfig it was tuned with, as written
    result: dict = field(default_factory=dict)
    perplexity: dict = field(default_factory=dict)  # eval set -> untuned / tuned figures
    created: str | None = None

    @classmethod
    def from_json(cls, raw: Mapping, where: str = "tuned.json") -> "TunedMeta":
        g = lambda key, kind=None, default=_MISSING: _get(raw, key, where, "", kind, default)  # noqa: E731
        return cls(ParentRef.from_json(g("parent"), where), TunedSizeInfo.from_json(g("size"), where),
                   g("files", dict), g("format_version", int), g("format", str, "float32"), g("finetune", dict, {}),
                   g("result", dict, {}), g("perplexity", dict, {}), g("created", str, None), raw=raw)

    @property
    def target(self) -> float:
        """The ratio the size was asked for (its size_ratio when not recorded)."""
        return self.size.target if self.size.target is not None else self.size.size_ratio

"""The official ACIP checkpoints (the paper's code; the hub's MerantixMomentum/acip_*): recognise, read,
convert into an ordinary artifact of ours.

An official checkpoint is a folder with `config.json` (`model_type: "acip_model"`) and safetensors
(one file or shards with an index). Per target layer X (key prefix `model.`):
`X.base_layer.parametrization.mask_score` (the score map), `X.lora_A.default.weight` [r, in] and
`X.lora_B.default.weight` [out, r] (scaled by lora_alpha / r) and, in the full storage only,
`.parametrization.ortho.weight` = U·sqrt(1/c) [out, k], `.parametrization.base.weight` = orthoᵀ·W [k, in]
and `.parametrization.S` (the singular values), c the mask scaling factor. The compact storage holds
scores and LoRA only. A layer's weight at a mask is U·diag(s ⊙ kept)·Vh: exactly our factorized form
over the plain SVD basis, so the score map, the adapters and (when stored) the factors carry over;
the official size rule is recorded (prune.SIZE_RULES) so every command reproduces their sizes
(ARCHITECTURE.md, "Official ACIP checkpoints").
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from acip_core.artifacts.artifact import Artifact, save_artifact
from acip_core.artifacts.meta import read_json
from acip_core.artifacts.open import target_fingerprint
from acip_core.engine.basis import Factors, basis_check, basis_for, default_recipe
from acip_core.engine.parametrize import target_linears
from acip_core.sources import models  # models.hub_reachable looked up at call time (tests stand in for the hub)
from acip_core.sources.models import load_base, recorded_source
from acip_core.system.version import versions

log = logging.getLogger(__name__)

HUB_PREFIX = "MerantixMomentum/acip_"  # the paper's published checkpoints
RATIO_NAMES = ("size_ratio", "compression_ratio")  # the first hub release said compression_ratio
_SCORE = re.compile(r"^model\.(?P<fqn>.+?)(?:\.base_layer)?\.parametrization\.mask_score$")
FACTOR_TOLERANCE = 5e-2  # relative error of U·diag(s)·Vh vs the base weight: bf16 factors ~1e-2, a wrong base ~1


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be read or converted; the message says which file and why."""


@dataclass
class OfficialCheckpoint:
    source: str  # as given: a folder or a hub id
    folder: Path  # the local folder (the hub snapshot for a hub id)
    config: dict
    targets: list[str]  # the parametrized module names (the last part of a layer's name)
    base: str  # the base model: a resolved local folder or a hub id
    mask_scale: float
    lora_rank: int
    lora_alpha: float  # effective: alpha·sqrt(r) under rsLoRA, so that alpha / r is the scale applied
    lora_dropout: float
    files: list[Path]  # the safetensors files holding the tensors
    size_ratio: float | None = None  # a ratio the config records (size_ratio or compression_ratio)
    keys: dict = field(default_factory=dict)  # tensor name -> file

    @property
    def storage(self) -> str:
        """"full" when the SVD factors are stored, "compact" when only scores and LoRA are."""
        return "full" if any(k.endswith(".parametrization.ortho.weight") for k in self.keys) else "compact"

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.keys[name], framework="pt") as f:
            return f.get_tensor(name)


def ratio_value(mapping: dict, where: str = "arguments") -> float | None:
    """The ratio under either name (size_ratio, or compression_ratio of the first hub release), or
    None; both given and different is an error. The value is the kept fraction in both."""
    found = {n: mapping[n] for n in RATIO_NAMES if mapping.get(n) is not None}
    values = set()
    for name, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise OfficialCheckpointError(f"{where}: {name} must be a number in [0, 1], got {value!r}")
        values.add(float(value))
    if len(values) > 1:
        raise OfficialCheckpointError(f"{where}: size_ratio and compression_ratio (its older name) "
                                      f"disagree ({found})")
    return values.pop() if values else None


def is_official_folder(folder: str | Path) -> bool:
    """A folder whose config.json says model_type acip_model (not checked further)."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") == "acip_model"
    except (OSError, ValueError, AttributeError):
        return False


def locate(source: str) -> Path:
    """The local folder of `source`: an existing folder, or a hub id downloaded (config and
    safetensors) with huggingface_hub.snapshot_download; offline, only a copy already in the local
    cache, and a clear error at once otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise OfficialCheckpointError(f"{source} is a file; give an official ACIP checkpoint's folder or hub id")
    if source.count("/") != 1 or any(c.isspace() for c in source) or source.startswith((".", "/", "~")):
        raise OfficialCheckpointError(f"{source!r} is neither a folder nor a hub id like "
                                      f"'{HUB_PREFIX}llama31_8b'")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json"]
    try:  # a snapshot already in the local cache works offline, if complete (a plan may have
        cached = Path(snapshot_download(source, allow_patterns=patterns, local_files_only=True))  # fetched
        if _complete(cached):  # config.json alone)
            return cached
    except Exception:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
        pass
    why = ("HF_HUB_OFFLINE is set" if models.hub_offline() else
           None if models.hub_reachable() else "the Hugging Face hub cannot be reached (offline?)")
    if why:
        raise OfficialCheckpointError(
            f"{source!r} is not in the local Hugging Face cache and {why}. Download it once online "
            f"(huggingface-cli download {source}) or pass the checkpoint's local folder.")
    log.info("downloading %s from the hub (config and safetensors)", source)
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - repository missing, gated, network: all said in words
        raise OfficialCheckpointError(f"could not download {source!r} from the Hugging Face hub "
                                      f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def _complete(folder: Path) -> bool:
    """Whether a cached snapshot holds a config and its weights: one file, or an index and every
    shard it names."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def read_checkpoint(source: str, base: str | None = None) -> OfficialCheckpoint:
    """Reads and checks an official checkpoint's config and tensor index (no tensor data yet).

    Args:
        source: its folder, or a hub id (MerantixMomentum/acip_*).
        base: the base model, overriding the one the config names (a folder or a hub id).
    """
    folder = locate(source)
    config_path = folder / "config.json"
    config = read_json(config_path, "an official ACIP checkpoint", OfficialCheckpointError)
    if not isinstance(config, dict) or config.get("model_type") != "acip_model":
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise OfficialCheckpointError(f"{config_path}: model_type is {got!r}, not 'acip_model': "
                                      "not an official ACIP checkpoint")

    def field_of(path: str, kind, default=None, required=True):
        value = config
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and not required:
            return default
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            what = "a number" if isinstance(kind, tuple) else f"a {kind.__name__}"
            raise OfficialCheckpointError(f"{config_path}: {path} must be {what}, got {value!r}")
        return value

    param = "parametrization_config"
    if field_of(f"{param}.module_factory_cls", str) != "svd":
        raise OfficialCheckpointError(f"{config_path}: {param}.module_factory_cls is "
                                      f"{config[param]['module_factory_cls']!r}; only 'svd' is understood")
    mask_func = field_of(f"{param}.module_factory_kwargs.mask_func", str, "ste", required=False)
    if mask_func != "ste":
        raise OfficialCheckpointError(f"{config_path}: mask_func {mask_func!r}; only 'ste' (a kept value is "
                                      "kept whole) maps to a size")
    mask_scale = float(field_of(f"{param}.module_factory_kwargs.mask_scaling_factor", (int, float)))
    if not mask_scale > 0:
        raise OfficialCheckpointError(f"{config_path}: mask_scaling_factor must be positive, got {mask_scale}")
    targets = field_of(f"{param}.target_modules", list)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise OfficialCheckpointError(f"{config_path}: {param}.target_modules must be a list of module names")
    base_named = field_of("base_model_config.pretrained_model_kwargs.pretrained_model_name_or_path", str)

    lora = config.get("adapter_config") and field_of("adapter_config.peft_config", dict).get("default")
    rank, alpha, dropout = 0, 16.0, 0.0
    if lora:
        if lora.get("peft_type", "LORA") != "LORA" or lora.get("use_dora"):
            raise OfficialCheckpointError(f"{config_path}: the adapter is {lora.get('peft_type')} "
                                          f"(use_dora={lora.get('use_dora')}); only plain LoRA is understood")
        if lora.get("rank_pattern") or lora.get("alpha_pattern"):
            raise OfficialCheckpointError(f"{config_path}: per-layer LoRA ranks or alphas (rank_pattern / "
                                          "alpha_pattern) are not supported")
        rank = field_of("adapter_config.peft_config.default.r", int)
        alpha = float(field_of("adapter_config.peft_config.default.lora_alpha", (int, float)))
        dropout = float(lora.get("lora_dropout") or 0.0)
        if rank <= 0:
            raise OfficialCheckpointError(f"{config_path}: LoRA r must be positive, got {rank}")
        if lora.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r); we apply alpha / r
            alpha = alpha * math.sqrt(rank)

    ratio = None
    for where in (config, config.get("model_kwargs") or {}):  # wherever a saved ratio may be recorded
        ratio = ratio_value(where, str(config_path)) if ratio is None else ratio
    keys = _tensor_index(folder)
    ckpt = OfficialCheckpoint(source, folder, config, list(targets),
                              recorded_source(base) if base else _resolve_base(base_named, folder),
                              mask_scale, rank, alpha, dropout, sorted(set(keys.values())), ratio, keys)
    log.info("official ACIP checkpoint %s: %s storage, %d tensors in %d file(s), base %s",
             source, ckpt.storage, len(keys), len(ckpt.files), ckpt.base)
    return ckpt


def _tensor_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors or a sharded checkpoint's index."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise OfficialCheckpointError(f"{index} is not a safetensors index ({err})") from None
        files = {f: folder / f for f in set(weight_map.values())}
        for f in files.values():
            if not f.is_file() or f.parent != folder:
                raise OfficialCheckpointError(f"{index} names {f.name}, which is not in {folder}")
        return {k: files[f] for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise OfficialCheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    try:
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise OfficialCheckpointError(f"{single} is not a valid safetensors file ({str(err)[:120]})") from None


def _resolve_base(name: str, folder: Path) -> str:
    """The base model the config names: a path relative to the checkpoint folder (or the folder above
    it: a compact/ subfolder beside base/, as the official loader resolves it from the family's
    folder), an absolute path, or a hub id."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [folder / path, folder.parent / path]
    for c in candidates:
        if (c / "config.json").is_file():
            return str(c.resolve())
    if not path.is_absolute() and name.count("/") == 1 and not name.startswith((".", "~")):
        return name  # a hub id: models.load_base reads it (or says at once why it cannot)
    raise OfficialCheckpointError(f"the base model {name!r} named in {folder / 'config.json'} was found "
                                  f"neither beside the checkpoint nor on the hub; pass it with --base")


def _layers(ckpt: OfficialCheckpoint, linears: dict) -> list[str]:
    """The checkpoint's layer names (our FQNs), checked against the base model's target linears."""
    names = [m.group("fqn") for k in ckpt.keys if (m := _SCORE.match(k))]
    if not names:
        raise OfficialCheckpointError(f"{ckpt.source}: no '...parametrization.mask_score' tensors: not an "
                                      "official ACIP checkpoint (or a storage without scores)")
    if set(names) != set(linears):
        extra, missing = sorted(set(names) - set(linears))[:3], sorted(set(linears) - set(names))[:3]
        raise OfficialCheckpointError(f"{ckpt.source}: its layers do not match the base model {ckpt.base!r} "
                                      f"(in the checkpoint only: {extra}; in the base only: {missing})")
    return [n for n in linears if n in set(names)]  # the base model's order


def _key(ckpt: OfficialCheckpoint, fqn: str, suffix: str) -> str:
    for key in (f"model.{fqn}.base_layer.{suffix}", f"model.{fqn}.{suffix}"):
        if key in ckpt.keys:
            return key
    raise OfficialCheckpointError(f"{ckpt.source} lacks the tensor model.{fqn}.base_layer.{suffix}")


def _official_factors(ckpt: OfficialCheckpoint, linears: dict, on_progress=None) -> tuple[dict, float]:
    """The stored SVD of every layer as our Factors (U = ortho·sqrt(c), s = S, Vh = base·sqrt(c)/s:
    their order and signs, so score i stays singular value i), and the largest relative error of
    U·diag(s)·Vh against the base weight (a wrong base model shows up here)."""
    root, worst, basis = math.sqrt(ckpt.mask_scale), 0.0, {}
    for i, (n, linear) in enumerate(linears.items()):
        ortho = ckpt.tensor(_key(ckpt, n, "parametrization.ortho.weight")).float()
        base = ckpt.tensor(_key(ckpt, n, "parametrization.base.weight")).float()
        s_key = f"model.{n}.base_layer.parametrization.S"
        down = base * root  # diag(s)·Vh
        s = ckpt.tensor(s_key).float() if s_key in ckpt.keys else down.norm(dim=1)
        k = min(linear.weight.shape)
        if ortho.shape != (linear.out_features, k) or base.shape != (k, linear.in_features) or s.shape != (k,):
            raise OfficialCheckpointError(f"{ckpt.source}: {n}'s factors have shapes {tuple(ortho.shape)}, "
                                          f"{tuple(base.shape)}, {tuple(s.shape)}; the base layer is "
                                          f"[{linear.out_features}, {linear.in_features}]")
        U, Vh = (ortho * root).contiguous(), (down / s.clamp_min(1e-30)[:, None]).contiguous()
        w = linear.weight.detach().float()
        worst = max(worst, float((U @ down - w).norm() / w.norm().clamp_min(1e-30)))
        basis[n] = Factors(U, s.contiguous(), Vh)
        if on_progress:
            on_progress(i + 1, len(linears))
    if not worst <= FACTOR_TOLERANCE:
        raise OfficialCheckpointError(f"{ckpt.source}: its stored factors reproduce the base model {ckpt.base!r} "
                                      f"only to a relative error of {worst:.3g} (> {FACTOR_TOLERANCE}): "
                                      "another base model?")
    return basis, worst


def convert(ckpt: OfficialCheckpoint, on_progress=None) -> Artifact:
    """The checkpoint as an ordinary artifact of ours (not yet written): scores from mask_score, adapters
    from lora_A/lora_B, the plain-SVD basis (their stored factors seeded into the basis cache, or an
    SVD of the base for the compact storage), their targets and the official size rule.
    on_progress(stage, done, total) reports the layers read."""
    start = time.perf_counter()
    log.info("loading the base model %s", ckpt.base)
    model, tokenizer = load_base(ckpt.base)
    linears = target_linears(model, ckpt.targets)
    names = _layers(ckpt, linears)
    linears = {n: linears[n] for n in names}
    scores, adapters = {}, {}
    for i, n in enumerate(names):
        s = ckpt.tensor(_key(ckpt, n, "parametrization.mask_score")).float()
        if s.shape != (min(linears[n].weight.shape),) or not torch.isfinite(s).all():
            raise OfficialCheckpointError(f"{ckpt.source}: {n}'s mask_score has shape {tuple(s.shape)} or "
                                          f"non-finite values; the layer has rank {min(linears[n].weight.shape)}")
        scores[n] = s.contiguous()
        if ckpt.lora_rank:
            for ours, theirs in (("lora_A", "lora_A.default"), ("lora_B", "lora_B.default")):
                key = f"model.{n}.{theirs}.weight"
                if key not in ckpt.keys:
                    raise OfficialCheckpointError(f"{ckpt.source} lacks {key} (its config has LoRA r={ckpt.lora_rank})")
                if f"model.{n}.{theirs}.bias" in ckpt.keys:
                    raise OfficialCheckpointError(f"{ckpt.source}: LoRA with a bias ({n}) is not supported")
                adapters[f"{n}.{ours}"] = ckpt.tensor(key).float().contiguous()
        if on_progress:
            on_progress("scores and adapters", i + 1, len(names))
        if (i + 1) % 50 == 0:
            log.info("read scores and adapters of %d / %d layers", i + 1, len(names))
    fp = target_fingerprint(linears)
    recipe = default_recipe("svd")
    error = [None]

    def stored_factors():  # called only when the basis cache does not hold this model's SVD yet
        log.info("reading the stored SVD factors of %d layers", len(names))
        basis, error[0] = _official_factors(ckpt, linears, on_progress and (
            lambda d, t: on_progress("factors", d, t)))
        return basis

    progress = on_progress and (lambda d, t: on_progress("SVD of the base", d, t))
    basis = basis_for(model, tokenizer, linears, recipe, fp, progress,
                      prebuilt=stored_factors if ckpt.storage == "full" else None)
    shapes = {n: [m.out_features, m.in_features, m.bias is not None] for n, m in linears.items()}
    meta = dict(
        model=dict(source=ckpt.base, fingerprint=fp, architecture=type(model).__name__,
                   model_type=model.config.model_type),
        targets=list(ckpt.targets),
        layers=shapes,
        basis=dict(recipe=recipe, check=basis_check(basis)),
        mask_scale=ckpt.mask_scale,
        lora=dict(rank=ckpt.lora_rank, alpha=ckpt.lora_alpha, dropout=ckpt.lora_dropout),
        size_rule="official",
        official=dict(source=ckpt.source, storage=ckpt.storage,
                      base_named=ckpt.config["base_model_config"]["pretrained_model_kwargs"]
                      ["pretrained_model_name_or_path"],
                      factor_error=error[0], size_ratio=ckpt.size_ratio,
                      torch_dtype=ckpt.config.get("torch_dtype"),
                      transformers_version=ckpt.config.get("transformers_version"),
                      bytes={p.name: p.stat().st_size for p in ckpt.files}),
        result=dict(imported=True, seconds=round(time.perf_counter() - start, 1)),
        versions=versions(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    log.info("converted %d layers of %s in %.1f s", len(names), ckpt.source, time.perf_counter() - start)
    return Artifact(meta, scores, adapters)


def import_official(source: str, out: str | Path, base: str | None = None, on_progress=None) -> Artifact:
    """Converts an official checkpoint (folder or hub id) once into an artifact folder `out`."""
    out = Path(out)
    if (out / "acip.json").exists():
        raise FileExistsError(f"{out} already holds an artifact; pick another --out")
    ckpt = read_checkpoint(source, base)
    artifact = convert(ckpt, on_progress)
    save_artifact(out, artifact)
    log.info("wrote %s", out)
    return artifact

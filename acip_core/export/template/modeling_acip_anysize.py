"""ACIP any-size causal LM: one folder, every size and format, chosen after loading.

Written by ACIP Studio next to config.json and model.safetensors, with modeling_acip.py (whose
layers it runs: LowRankLinear, Bf16Linear, QuantLinear, QuantLowRankLinear). Needs only torch and
transformers. Load with

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True[, size_ratio=0.6, format="int4"])
    model.set_size(0.5)                      # any kept fraction of the compressed layers, in [0, 1]
    model.set_size(budget_gb=0.12)           # the best measured (size, format) within 0.12 GB (curve.csv)
    model.set_size(0.7, format="bfloat16")   # float32 (float32 folders only), bfloat16, int8, float8, int4

config.json → `acip_anysize` describes what is stored. Each compressed layer holds its factors once,
in the artifact's score order with the LoRA merged in front, down = [(α/r)·A ; diag(s)·Vh] and
up_t = [Bᵀ ; Uᵀ]: keeping rank r is the row prefix [:lora + r]. Only the rows some size uses
factorized are stored (past them the layer runs its original weight, which is stored too). The
global order (`acip_index.layer_of`: the layer of each score entry, best first) turns a size ratio
into ranks; `acip_index.bytes_<format>` holds the bytes of the model after each prefix. The int4 codes
of the factors are stored as ACIP Studio quantized them (GPTQ on its calibration text); a float32
folder computes int8 and float8 codes and the dense weights' int4 codes from its float32 weights on first
use, as ACIP Studio computes them (a bfloat16 folder stores those too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .modeling_acip import (Bf16Linear, LowRankLinear, QuantLinear, QuantLowRankLinear, base_classes, derived_config,
                            own_dtype, use_decode_attention)

CONFIG_PREFIX, MODEL_PREFIX, MODEL_TYPE_PREFIX = "ACIPAnySizeConfig__", "ACIPAnySizeForCausalLM__", "acip_anysize_"
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def buffer_name(key: str) -> str:
    """A format key as a tensor name part (int4-g32 -> int4_g32)."""
    return "".join(c if c.isalnum() else "_" for c in key)


def quantize_int8(weight: torch.Tensor, dtype=torch.bfloat16):
    """(codes int8 [out, in], scales [out]) symmetric per row: ACIP Studio's formats.int8.quantize_int8."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(dtype).float()
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.to(dtype).contiguous()


FLOAT8_MAX = 448.0  # e4m3's largest finite value


def quantize_float8(weight: torch.Tensor):
    """(codes float8_e4m3fn [out, in], scales float32 [out]): each row scaled to its largest magnitude,
    ACIP Studio's formats.float8.quantize_float8."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FLOAT8_MAX).clamp_min(1e-12)
    return (w / scale[:, None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


# the formats with one scale per row: (code dtype, scale dtype, quantizer, codes of w on given row scales)
ROW_SCALED = {
    "int8": (torch.int8, torch.bfloat16, quantize_int8,
             lambda w, s: torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)),
    "float8": (torch.float8_e4m3fn, torch.float32, quantize_float8,
               lambda w, s: (w / s[:, None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)),
}

INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # ACIP Studio's formats._INT4_CLIPS


def group_for(group_size: int, in_features: int) -> int:
    """The int4 group length for an input size: the largest of 32, 64, 128 up to group_size that divides
    it (ACIP Studio's formats.int4 group_for; SmolLM2's 576-wide inputs take 64 when 128 is asked)."""
    return max(g for g in (32, 64, 128) if g <= group_size and in_features % g == 0)


def quantize_int4(weight: torch.Tensor, group: int, dtype=torch.bfloat16):
    """(codes two per byte [rows, in/2] uint8, scales [in/group, rows, 2]; rows padded with zeros to 32):
    round to nearest on the per-group grid with the least squared error among INT4_CLIPS, ACIP Studio's
    formats.int4.quantize_int4 without a Gram (how it quantizes a dense layer), step for step."""
    w = weight.detach().float()
    rows = -(-w.shape[0] // 32) * 32
    w = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])]) if rows > w.shape[0] else w
    wg = w.reshape(rows, -1, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    mid = (lo + hi) / 2
    best_err = best = None
    for c in INT4_CLIPS:
        scale = ((hi - lo) * c / 15).clamp_min(1e-8).to(dtype).float()
        zero = (mid - (hi - lo) * c / 2 + 8 * scale).to(dtype).float()
        q = torch.round((wg - zero) / scale + 8).clamp(0, 15)
        err = ((q - 8) * scale + zero - wg).pow(2).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, (scale, zero)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = tuple(torch.where(better, new, old) for new, old in zip((scale, zero), best))
    scale, zero = best
    codes = torch.round((wg - zero) / scale + 8).clamp(0, 15).to(torch.uint8).reshape(rows, -1)
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), sz


def _meta(cls, *args, **kwargs):
    """A module built without allocating (its tensors are set right after)."""
    with torch.device("meta"):
        return cls(*args, **kwargs)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _Zero(nn.Module):
    """A layer that keeps nothing: y = 0 (+ bias)."""

    def __init__(self, out_features: int, bias):
        super().__init__()
        self.out_features, self.__dict__["b"] = out_features, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        return y if self.b is None else y + self.b


class AnySizeLinear(nn.Module):
    """One compressed layer at every size: the stored tensors, and the module the chosen size runs."""

    def __init__(self, spec: dict, anysize: dict):
        super().__init__()
        self.spec, self.lora = spec, int(anysize["lora_rank"])
        self.in_features, self.out_features = int(spec["in"]), int(spec["out"])
        dtype = FLOATS[anysize["dtype"]]
        i, o, rows = self.in_features, self.out_features, int(spec["rows"])
        self.weight = nn.Parameter(torch.empty(o, i, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(o, dtype=dtype)) if spec["bias"] else None
        self.down = nn.Parameter(torch.empty(rows, i, dtype=dtype))
        self.up_t = nn.Parameter(torch.empty(rows, o, dtype=dtype))
        for key, format in anysize["formats"].items():
            name, q = buffer_name(key), spec["quant_rows"].get(key)
            if format["kind"] in ROW_SCALED:
                code_dtype, scale_dtype = ROW_SCALED[format["kind"]][:2]
                if format["codes"] == "computed":
                    self.register_buffer(f"{name}_up_s", torch.zeros(o, dtype=scale_dtype))
                    continue
                for part, shape in (("down", (q, i)), ("up", (o, q)), ("weight", (o, i))):
                    self.register_buffer(f"{name}_{part}_q", torch.zeros(shape, dtype=code_dtype))
                    self.register_buffer(f"{name}_{part}_s", torch.zeros(shape[0], dtype=scale_dtype))
            elif format["kind"] == "int4":
                g, o32 = int(format["group_size"]), -(-o // 32) * 32
                parts = (("down", (q, i)), ("up", (o32, q)), ("weight", (o32, i)))
                for part, (r, k) in parts[:2] if format.get("dense_codes") == "computed" else parts:
                    self.register_buffer(f"{name}_{part}_q", torch.zeros(r, k // 2, dtype=torch.uint8))
                    self.register_buffer(f"{name}_{part}_s", torch.zeros(k // group_for(g, k), r, 2, dtype=torch.bfloat16))
        self.__dict__["_family"] = {}  # format key -> (dense weight, down, up) in that format, built once
        self.__dict__["runner"] = None  # the module the chosen size runs (not a child: never saved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runner is None:
            raise RuntimeError("no size chosen yet: call model.set_size(...)")
        return self.runner(x)

    def runs_dense(self, key: str, rank: int) -> bool:
        return rank >= int(self.spec["dense_from"][key])

    def kept(self, format: dict, rank: int) -> int:
        """Rows kept for `rank` (LoRA included; int formats round up to their rank step)."""
        keep, step = self.lora + rank, int(format["step"])
        return min(-(-keep // step) * step, int(self.spec["padded"][format["key"]])) if keep else 0

    def set_rank(self, format: dict, rank: int) -> None:
        self.__dict__["runner"] = self.build(format, rank)

    def build(self, format: dict, rank: int) -> nn.Module:
        key, kind = format["key"], format["kind"]
        dense = self.runs_dense(key, rank)
        keep = self.kept(format, rank)
        weight, down, up = self._family_of(format)
        i, o = self.in_features, self.out_features
        if not dense and not keep:  # rank 0 and no LoRA: the layer's output is its bias
            dtype = FLOATS.get(kind, torch.bfloat16)
            return _Zero(o, None if self.bias is None else self.bias.detach().to(dtype))
        if kind in FLOATS:
            dtype = FLOATS[kind]
            bias = None if self.bias is None else _frozen(self.bias.detach().to(dtype))
            if dense:
                m = _meta(Bf16Linear, i, o, bias=self.bias is not None)
                m.weight = _frozen(weight)
            else:
                m = _meta(LowRankLinear, i, o, keep, bias=self.bias is not None)
                m.down.__class__ = Bf16Linear  # as modeling_acip.factorize_ makes it
                m.down.weight, m.up_t = _frozen(down[:keep]), _frozen(up[:keep])
            m.bias = bias
            return m
        quant = {"kind": kind, "group_size": format.get("group_size")}
        bias = None if self.bias is None else _frozen(self.bias.detach().to(torch.bfloat16))
        if dense:
            m = _meta(QuantLinear, i, o, quant, bias=self.bias is not None, dtype=torch.bfloat16)
            m.qweight, m.scales = weight
            m.bias = bias
            return m
        m = _meta(QuantLowRankLinear, i, o, keep, quant, bias=self.bias is not None, dtype=torch.bfloat16)
        if kind in ROW_SCALED:  # down: a row prefix; up: a column prefix (scales per output row)
            m.down.qweight, m.down.scales = down[0][:keep], down[1][:keep]
            m.up.qweight, m.up.scales = up[0][:, :keep].contiguous(), up[1]
        else:  # int4: rows of down, whole groups of up's columns (two codes a byte along the input)
            g = int(format["group_size"])
            m.down.qweight, m.down.scales = down[0][:keep], down[1][:, :keep].contiguous()
            m.up.qweight, m.up.scales = up[0][:, : keep // 2].contiguous(), up[1][: keep // g]
        m.up.bias = bias
        return m

    def _float32_weights(self, key: str) -> None:
        """Codes are computed from the float32 weights (ACIP Studio's numbers); others would round
        otherwise: refused."""
        if self.weight.dtype != torch.float32:
            raise ValueError(f"{key} computes its codes from this folder's float32 weights, which are now "
                             f"{str(self.weight.dtype).removeprefix('torch.')} (a dtype= at load, or .to()): "
                             "keep them float32")

    def _family_of(self, format: dict):
        """(dense weight, down, up) in `format`, built on first use and kept (ACIP Studio's "family")."""
        key = format["key"]
        if key in self._family:
            return self._family[key]
        name = buffer_name(key)
        if format["kind"] in FLOATS:
            dtype = FLOATS[format["kind"]]
            same = self.weight.dtype == dtype  # the stored tensors themselves
            fam = tuple(t.detach() if same else t.detach().to(dtype) for t in (self.weight, self.down, self.up_t))
        elif format["kind"] in ROW_SCALED and format["codes"] == "computed":
            self._float32_weights(key)
            # the factors quantized as ACIP Studio does: rows padded with zeros to the padded rank, down per
            # row; up per output row over its whole padded rank (the stored scales: rows past the stored
            # prefix count in them), the codes of the kept columns rounded on that grid
            quantize, codes_on = ROW_SCALED[format["kind"]][2:]
            q = int(self.spec["quant_rows"][key])
            down32 = self.down.detach().float()
            down32 = torch.cat([down32, down32.new_zeros(max(q - down32.shape[0], 0), down32.shape[1])])[:q]
            up32 = self.up_t.detach().float()
            up32 = torch.cat([up32, up32.new_zeros(max(q - up32.shape[0], 0), up32.shape[1])])[:q].t()
            scales = getattr(self, f"{name}_up_s")
            fam = (quantize(self.weight), quantize(down32), (codes_on(up32, scales).contiguous(), scales))
        else:
            fam = tuple((getattr(self, f"{name}_{p}_q"), getattr(self, f"{name}_{p}_s"))
                        if p != "weight" or format.get("dense_codes") != "computed" else None
                        for p in ("weight", "down", "up"))
            if fam[0] is None:  # the dense weight's codes: round to nearest from float32, as ACIP Studio does
                self._float32_weights(key)
                fam = (quantize_int4(self.weight, group_for(int(format["group_size"]), self.in_features)),) + fam[1:]
        self._family[key] = fam
        return fam


class AnySizeMixin:
    """set_size() and the budget rule, on top of the base CausalLM class."""

    def _anysize_init(self, config) -> None:
        spec = config.acip_anysize
        self.acip_index = nn.Module()
        n = int(spec["entries"])
        self.acip_index.register_buffer("layer_of", torch.zeros(n, dtype=torch.int32))
        self.acip_index.register_buffer("paper_cum", torch.zeros(n + 1, dtype=torch.int64))
        if spec.get("size_rule") == "official":  # the scores in the global order: the official threshold
            self.acip_index.register_buffer("descending", torch.zeros(n, dtype=torch.float32))
        for key in spec["formats"]:
            self.acip_index.register_buffer(f"bytes_{buffer_name(key)}", torch.zeros(n + 1, dtype=torch.int64))
        for name in spec["layer_names"]:  # the order of acip_index.layer_of (config keys may be re-sorted)
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, AnySizeLinear(spec["layers"][name], spec))
        for m in self.modules():  # ACIP Studio's class for every other linear (float32 products unchanged)
            if type(m) is nn.Linear:
                m.__class__ = Bf16Linear
        self.__dict__["acip_size"] = None

    # -- choosing a size -------------------------------------------------------------------------
    @property
    def acip_formats(self) -> list:
        return list(self.config.acip_anysize["formats"])

    def _format(self, format: str | None) -> dict:
        formats = self.config.acip_anysize["formats"]
        if format is None:
            format = (self.acip_size or {}).get("format") or next(iter(formats))
        key = str(format).removeprefix("torch.")
        if key not in formats:  # "int4" names this folder's int4 (e.g. int4-g32)
            key = next((k for k, f in formats.items() if f["kind"] == key), key)
        if key not in formats:
            raise ValueError(f"format {format!r} is not in this folder; it holds {list(formats)}")
        return dict(formats[key], key=key)

    def prefix_for_ratio(self, size_ratio: float) -> int:
        """Fewest score entries whose size ratio is >= size_ratio (ACIP Studio's RankIndex rule), or,
        for an imported official checkpoint (size_rule "official"), the official code's rule: prune the
        k lowest scores for the largest k >= 1 whose ratio stays strictly above size_ratio, scores tied
        at the threshold pruned together."""
        size_ratio = float(size_ratio)
        if not 0.0 <= size_ratio <= 1.0:
            raise ValueError(f"size_ratio must be within [0, 1], got {size_ratio}")
        if size_ratio == 1.0:
            return int(self.config.acip_anysize["entries"])
        if self.config.acip_anysize.get("size_rule") == "official":
            ascending = self.acip_index.descending.flip(0)
            kept = len(ascending) - torch.searchsorted(ascending, ascending, right=True)  # for k = 1..n
            above = (self.acip_index.paper_cum[kept].double() / self.config.acip_anysize["dense_total"]) > size_ratio
            return int(kept[max(int(above.sum()), 1) - 1])
        need = torch.tensor([size_ratio * self.config.acip_anysize["dense_total"] - 1e-6], dtype=torch.float64)
        return int(torch.searchsorted(self.acip_index.paper_cum.double(), need, side="left"))

    def prefix_for_budget(self, budget_gb: float, key: str) -> int:
        """Most entries whose model fits in budget_gb (1 GB = 1e9 bytes) in format `key`; -1 if none."""
        cum = getattr(self.acip_index, f"bytes_{buffer_name(key)}")
        max_bytes = int(min(budget_gb, 1e9) * 1e9 + 1e-3)  # as ACIP Studio's size_for_budget
        return int(torch.searchsorted(cum, torch.tensor([max_bytes]), side="right")) - 1

    def size_info(self, prefix: int, key: str) -> dict:
        spec = self.config.acip_anysize
        ratio = float(self.acip_index.paper_cum[prefix]) / spec["dense_total"]
        nbytes = int(getattr(self.acip_index, f"bytes_{buffer_name(key)}")[prefix])
        return dict(prefix=prefix, format=key, size_ratio=ratio, bytes=nbytes, gb=nbytes / 1e9)

    def best_for_budget(self, budget_gb: float, format: str | None = None, eval_set: str = "heldout") -> dict:
        """ACIP Studio's budget answer (curve.rank_for_budget; with `format`, curve.best_in_format): in each
        format the largest size that fits and every measured size below it, ranked by the curve's
        perplexity on `eval_set`: the lowest wins unless a larger size is within noise of it (`_pick`).
        Returns dict(prefix, format, size_ratio, bytes, gb, perplexity, noise)."""
        budget_gb = float(budget_gb)
        if not budget_gb == budget_gb or budget_gb <= 0:
            raise ValueError(f"the budget must be a positive number of GB, got {budget_gb}")
        acip = _comparable_acip(_curve_rows(self.config.acip_anysize))
        keys = [self._format(format)["key"]] if format is not None else \
            [k for k in dict.fromkeys(r["format"] for r in acip) if k in self.acip_formats]
        if not keys:  # no measured curve for this folder's formats: the largest size in the current one
            keys = [self._format(None)["key"]]
        picks, pool, smallest = {}, [], []
        for key in keys:
            largest = self.prefix_for_budget(budget_gb, key)
            if largest < 0:
                smallest.append((self.size_info(0, key)["gb"], key))
                continue
            top, line, found = self.size_info(largest, key), [r for r in acip if r["format"] == key], []
            for ratio in [top["size_ratio"]] + [r["size_ratio"] for r in line if r["size_ratio"] < top["size_ratio"] - 1e-9]:
                info = top if ratio == top["size_ratio"] else self.size_info(self.prefix_for_ratio(ratio), key)
                ppl = _interpolate_ppl(line, info["size_ratio"], eval_set)
                if ppl is not None and info["gb"] <= budget_gb:
                    found.append(dict(info, perplexity=ppl, noise=_noise_at(line, info["size_ratio"], eval_set)))
            picks[key] = _pick(found) or dict(top, perplexity=None, noise=None)
            pool += found
        if not picks:
            gb, key = min(smallest)
            raise ValueError(f"{budget_gb:g} GB is smaller than the smallest model ({gb:.4f} GB in {key})")
        if format is not None or not acip:
            return next(iter(picks.values()))
        winner = _pick(pool)
        if winner is None:
            raise ValueError(f"{budget_gb:g} GB holds no measured size in any format (measured sizes start at "
                             f"{min(r['size_ratio'] for r in acip):.2f}; pass format= for an unmeasured size)")
        return picks[winner["format"]]  # that format's own answer, as the app shows it

    def set_size(self, size_ratio: float | None = None, format: str | None = None, budget_gb: float | None = None,
                 eval_set: str = "heldout") -> dict:
        """Runs the model at a size: `size_ratio` (kept fraction of the compressed layers' parameters),
        or the best size within `budget_gb` (in `format`, or the best format by the folder's curve).
        Returns what was chosen; `model.acip_size` keeps it."""
        if (size_ratio is None) == (budget_gb is None):
            raise ValueError("give one of size_ratio or budget_gb")
        pick = {}
        if budget_gb is not None:
            pick = self.best_for_budget(budget_gb, format, eval_set)
            prefix, format = pick["prefix"], self._format(pick["format"])
        else:
            format = self._format(format)
            prefix = self.prefix_for_ratio(size_ratio)
        return self._run_prefix(prefix, format, pick.get("perplexity"))

    def _run_prefix(self, prefix: int, format: dict, perplexity=None) -> dict:
        """Builds the size of the first `prefix` score entries in `format` and runs it."""
        names = self.config.acip_anysize["layer_names"]
        layers = [self.get_submodule(n) for n in names]
        if format["kind"] == "float32" and layers and layers[0].weight.dtype != torch.float32:
            raise ValueError(f"this model holds {str(layers[0].weight.dtype).removeprefix('torch.')} weights (a "
                             "bfloat16 folder, or a dtype= at load, or .to()): float32 needs the float32 any-size "
                             "folder, loaded without dtype=")
        ranks = torch.bincount(self.acip_index.layer_of[:prefix].long(), minlength=len(layers)).tolist()
        self._set_compute_dtype(FLOATS.get(format["kind"], torch.bfloat16))
        dense = 0
        for layer, rank in zip(layers, ranks):
            layer.set_rank(format, rank)
            dense += layer.runs_dense(format["key"], rank)
        info = dict(self.size_info(prefix, format["key"]), dense_layers=dense, ranks=dict(zip(names, ranks)),
                    perplexity=perplexity)  # the curve's, for a budget's pick
        self.__dict__["acip_size"] = info
        return info

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .half(), ... as on any module. The size's own modules, each format's tensors
        and the stored copies of the other parameters are not children, so they follow here: the copies
        converted too, the formats' tensors dropped (built again on use) and the current size rebuilt.
        The index (acip_index: exact integer and float32 tables read on the CPU) stays as it is."""
        index = self._modules.pop("acip_index", None)
        try:
            out = super()._apply(fn, recurse)
        finally:
            if index is not None:
                self._modules["acip_index"] = index
        masters = self.__dict__.get("_acip_masters")
        if masters is not None:
            self.__dict__["_acip_masters"] = {k: (p, fn(m)) for k, (p, m) in masters.items()}
        for m in self.modules():
            if isinstance(m, AnySizeLinear):
                m._family.clear()
        size = self.__dict__.get("acip_size")
        if size is not None:
            self._run_prefix(size["prefix"], self._format(size["format"]), size.get("perplexity"))
        return out

    def _set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Every parameter outside the compressed layers (embeddings, norms, head: tied ones stay one
        tensor) in `dtype`, cast from the stored ones as from_pretrained(dtype=...) does."""
        if "_acip_masters" not in self.__dict__:
            skip = {id(p) for m in self.modules() if isinstance(m, AnySizeLinear) for p in m.parameters()}
            self.__dict__["_acip_masters"] = {id(p): (p, p.detach()) for p in self.parameters() if id(p) not in skip}
        for p, master in self.__dict__["_acip_masters"].values():
            if p.dtype != dtype:
                p.data = master.to(dtype)


def _curve_rows(anysize: dict) -> list:
    """The ACIP rows of the artifact's curve that config.json carries (format, size_ratio, windows,
    ppl_<eval set>; a missing value as NaN)."""
    nan = float("nan")
    return [{k: (nan if v is None else v) for k, v in row.items()} for row in anysize.get("curve", [])]


def _comparable_acip(rows: list) -> list:
    """Rows of the formats measured on the window count most formats share (curve.comparable_acip)."""
    per_format = {}
    for r in rows:
        w = r.get("windows", float("nan"))
        if w == w:
            per_format[r["format"]] = max(per_format.get(r["format"], w), w)
    if not per_format:
        return rows
    counts = {}
    for w in per_format.values():
        counts[w] = counts.get(w, 0) + 1
    mode = min(w for w, c in counts.items() if c == max(counts.values()))
    return [r for r in rows if per_format.get(r["format"]) == mode]


def _noise_at(line: list, size_ratio: float, eval_set: str):
    """One standard error of log perplexity at size_ratio on one format's line (curve.noise_at:
    nll_std / √windows, interpolated between measured sizes); None where the curve records no spread."""
    col = f"nll_std_{eval_set}"
    pts = sorted(((r["size_ratio"], r[col] / math.sqrt(max(r["windows"], 1))) for r in line
                  if all(k in r and r[k] == r[k] for k in ("size_ratio", col, "windows"))), key=lambda p: p[0])
    if not pts:
        return None
    return float(np.interp(size_ratio, [p[0] for p in pts], [p[1] for p in pts]))


def _pick(candidates: list):
    """ACIP Studio's ranking rule (curve._pick): the lowest perplexity wins unless a larger size (or, at
    the same size, a format with more bytes) is within noise of it, one standard error of the two log
    perplexities' difference; then the largest such wins. None without candidates."""
    if not candidates:
        return None
    best = min(candidates, key=lambda c: c["perplexity"])

    def tied(c):
        se = math.hypot(c["noise"] or 0.0, best["noise"] or 0.0)
        return math.log(c["perplexity"]) - math.log(best["perplexity"]) <= se

    return max((c for c in candidates if tied(c)), key=lambda c: (round(round(c["size_ratio"], 5), 4), c["gb"]))


def _interpolate_ppl(line: list, size_ratio: float, eval_set: str):
    """Perplexity at size_ratio on one format's line: log-linear between measured neighbours
    (curve.interpolate_ppl); None outside the measured range."""
    col = f"ppl_{eval_set}"
    pts = [(r["size_ratio"], r[col]) for r in line if col in r and r[col] == r[col] and r["size_ratio"] == r["size_ratio"]]
    if not pts:
        return None
    lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
    if not lo - 1e-6 <= size_ratio <= hi + 1e-6:
        return None
    if len(pts) == 1:
        return float(pts[0][1])
    at = min(max(size_ratio, lo), hi)
    pts = sorted((a, b) for a, b in pts if b > 0 and math.isfinite(b))
    if len(pts) < 2 or not pts[0][0] <= at <= pts[-1][0]:
        return None
    xs, ys = zip(*pts)
    return float(math.exp(np.interp(at, xs, np.log(ys))))


_CLASSES: dict = {}


def classes_for(base_model_type: str):
    """(config class, model class) for a base model_type, built once per process."""
    if base_model_type not in _CLASSES:
        base_config, base_model = base_classes(base_model_type)
        config_cls = derived_config(base_config, CONFIG_PREFIX + base_model_type, MODEL_TYPE_PREFIX + base_model_type,
                                    f"{base_config.__name__} plus `acip_anysize` (what the any-size folder stores).",
                                    __name__)

        def __init__(self, config, *args, **kwargs):
            base_model.__init__(self, config, *args, **kwargs)
            self._anysize_init(config)

        def from_pretrained(cls, *args, size_ratio=None, format=None, budget_gb=None, **kwargs):
            model = base_model.from_pretrained.__func__(cls, *args, **own_dtype(kwargs))
            use_decode_attention(model)  # the app's decode attention (modeling_acip.decode_sdpa)
            default = model.config.acip_anysize.get("default", {})
            if budget_gb is not None:
                model.set_size(budget_gb=budget_gb, format=format)
            else:
                model.set_size(default.get("size_ratio", 1.0) if size_ratio is None else size_ratio,
                               format if format is not None else default.get("format"))
            return model

        model_cls = type(MODEL_PREFIX + base_model_type, (AnySizeMixin, base_model), {
            "__module__": __name__,
            "__doc__": f"{base_model.__name__} at any size: set_size(size_ratio | budget_gb, format).",
            "config_class": config_cls,
            "__init__": __init__,
            "from_pretrained": classmethod(from_pretrained),
        })
        _CLASSES[base_model_type] = (config_cls, model_cls)
    return _CLASSES[base_model_type]


def __getattr__(name: str):  # ACIPAnySizeConfig__llama, ACIPAnySizeForCausalLM__qwen2, ... (named in auto_map)
    for prefix, which in ((CONFIG_PREFIX, 0), (MODEL_PREFIX, 1)):
        if name.startswith(prefix) and len(name) > len(prefix):
            return classes_for(name[len(prefix):])[which]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

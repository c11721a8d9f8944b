"""ACIP low-rank causal LM: a stock transformers architecture whose listed linear layers are
factorized into two smaller linears, y = down(x) @ up_t + bias with down [rank, in] and
up_t [rank, out] (the layout ACIP Studio computes with, so both give the same numbers in every dtype).

Written by ACIP Studio next to config.json and model.safetensors. Self-contained: it needs only
torch and transformers (no ACIP Studio). Load with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

config.json names the base architecture (`acip_base_model_type`, e.g. "llama" or "qwen2") and the
factorized layers with their ranks (`acip_ranks`, {module name: rank}); every other layer is the
base architecture's own, except GPT-2-style Conv1D layers listed in `acip_transposed`, stored and run
as nn.Linear ([out, in]). A weight-only int8/int4/float8 export also has `acip_quant` ({"kind",
"group_size", "embeddings", "head", "dense": [names]}): every factor and every listed dense layer then
holds codes (`qweight`: int8, float8 e4m3, or two 4-bit codes per uint8 byte, low nibble first) and
`scales` (int8: one bf16 per output row; float8: one float32 per output row; int4: [in/group, rows, 2]
scale and zero, w = (q - 8)·scale + zero; table KINDS), multiplied on the CPU by torch's weight-only
kernels with bfloat16 activations (float8: its codes cast to bf16; elsewhere by the dequantized
matrix). With "embeddings" "int8" the embedding holds int8 codes too, and the head reads them (tied)
or holds its own (`head` "own"). `auto_map` names ACIPConfig__<base> and ACIPForCausalLM__<base>: this
module builds those classes on first use, subclassing the base config and CausalLM classes.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import CONFIG_MAPPING, AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

CONFIG_PREFIX, MODEL_PREFIX, MODEL_TYPE_PREFIX = "ACIPConfig__", "ACIPForCausalLM__", "acip_lowrank_"
# config.json carries both rope_theta (4.x) and rope_parameters (5.x); 4.56 is the first to read the
# `dtype` of config.json and of from_pretrained (older ones load everything in float32, which the
# quantized layers' bf16 scales refuse and which is not the bf16 export's numbers)
MIN_TRANSFORMERS = (4, 56)
TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())

if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
    raise ImportError(f"this model needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}; "
                      f"found {transformers.__version__}: pip install -U transformers")


class LowRankLinear(nn.Module):
    """y = down(x) @ up_t + bias: a rank-`rank` stand-in for nn.Linear(in_features, out_features, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up_t = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(self.down(x), self.up_t.t(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# torch's CPU int8 kernel multiplies input sizes that are multiples of 8, and of 16 where it runs its
# AVX-512 code (8 mod 16 gives NaN or crashes there, torch 2.13); other factors: codes cast, scale after.
INT8_INPUT_MULTIPLE = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


# torch's CPU int8 kernel crashes the process (SIGSEGV, torch 2.13 on AVX-512) when its weight does not
# start on a 64-byte boundary and it multiplies 16 rows or more; from_pretrained can hand a buffer that
# starts anywhere in the safetensors file. So what a kernel reads is first made 64-byte aligned.
ALIGNMENT = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous and 64-byte aligned (or not on the CPU), else an aligned contiguous copy."""
    if t.device.type != "cpu" or (t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0):
        return t
    out = t.contiguous().clone()
    if out.data_ptr() % ALIGNMENT:
        nbytes = out.numel() * out.element_size()
        buf = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
        start = -buf.data_ptr() % ALIGNMENT
        out = buf[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)
    return out


_INT8_MM = torch.ops.aten._weight_int8pack_mm  # torch's CPU kernels
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu


class Int8Codes:
    """int8 codes [out, in], a scale per row: w = q · scale."""

    @staticmethod
    def rows(out_features: int) -> int:
        return out_features

    @staticmethod
    def buffers(layer, rows: int, dtype) -> dict:
        return {"qweight": torch.zeros(rows, layer.in_features, dtype=torch.int8),
                "scales": torch.zeros(rows, dtype=dtype)}

    @staticmethod
    def dequantize(layer) -> torch.Tensor:
        return layer.qweight.float() * layer.scales.float()[:, None]

    @staticmethod
    def cpu_product(layer, x2: torch.Tensor) -> torch.Tensor:
        if layer.in_features % INT8_INPUT_MULTIPLE:  # codes cast, scale after (as the app)
            return bf16_linear(x2, layer.qweight.to(x2.dtype)) * layer.scales
        layer._align_()
        return _INT8_MM(x2.contiguous(), layer.qweight, layer.scales)


class Int4Codes:
    """int4 codes two per byte, low nibble first ([rows, in / 2], rows padded to 32), scale and zero
    per group of inputs ([in / group, rows, 2]): w = (q - 8) · scale + zero."""

    @staticmethod
    def rows(out_features: int) -> int:
        return -(-out_features // 32) * 32

    @staticmethod
    def buffers(layer, rows: int, dtype) -> dict:
        layer.group = max(g for g in (32, 64, 128) if g <= layer.group and layer.in_features % g == 0)
        return {"qweight": torch.zeros(rows, layer.in_features // 2, dtype=torch.uint8),
                "scales": torch.zeros(layer.in_features // layer.group, rows, 2, dtype=dtype)}

    @staticmethod
    def dequantize(layer) -> torch.Tensor:
        rows, g = layer.qweight.shape[0], layer.group
        sz = layer.scales.float()
        scale, zero = sz[..., 0].t()[:, :, None], sz[..., 1].t()[:, :, None]
        return ((layer.codes().float().reshape(rows, -1, g) - 8) * scale + zero).reshape(rows, -1)

    @staticmethod
    def cpu_product(layer, x2: torch.Tensor) -> torch.Tensor:
        layer._align_()
        if layer._packed is None:  # torch's CPU layout, built once from the portable codes
            layer._packed = aligned(torch.ops.aten._convert_weight_to_int4pack_for_cpu(layer.codes().contiguous(), 1))
        return _INT4_MM(x2.contiguous(), layer._packed, layer.group, layer.scales)


class Float8Codes(Int8Codes):
    """float8 (e4m3) codes [out, in], a float32 scale per row: w = q · scale (int8's rows and
    dequantization). The codes cast to the activations' dtype (exact), the product in it, the scale
    applied after (as ACIP Studio on a CPU)."""

    @staticmethod
    def buffers(layer, rows: int, dtype) -> dict:
        return {"qweight": torch.zeros(rows, layer.in_features, dtype=torch.float8_e4m3fn),
                "scales": torch.zeros(rows, dtype=torch.float32)}

    @staticmethod
    def cpu_product(layer, x2: torch.Tensor) -> torch.Tensor:
        return (bf16_linear(x2, layer.qweight.to(x2.dtype)).float() * layer.scales.float()).to(x2.dtype)


# config.json's acip_quant["kind"] -> how its codes are stored and multiplied (ACIP Studio's format
# registry writes the kind; a new format is one entry here)
KINDS = {"int8": Int8Codes, "int4": Int4Codes, "float8": Float8Codes}


class QuantLinear(nn.Module):
    """y = x·Wᵀ (+ b) with W stored as codes and scales of a kind in KINDS (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, quant: dict, bias: bool = False, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.group = quant["kind"], quant.get("group_size")
        if self.kind not in KINDS:
            raise ValueError(f"this model's weights are {self.kind!r}; this module reads {sorted(KINDS)}: "
                             f"export it again with the ACIP Studio that wrote it")
        codes = KINDS[self.kind]
        dtype = dtype or torch.bfloat16
        for name, t in codes.buffers(self, codes.rows(out_features), dtype).items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self._packed = None

    def codes(self) -> torch.Tensor:
        """int4: the 0..15 codes [rows, in] (int32)."""
        q = self.qweight.to(torch.int32)
        return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)

    def dequantize(self) -> torch.Tensor:
        return KINDS[self.kind].dequantize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if 0 in self.qweight.shape:
            y = x2.new_zeros(x2.shape[0], self.qweight.shape[0])
        elif x2.device.type != "cpu":
            y = nn.functional.linear(x2, self.dequantize().to(x2.device, x2.dtype))
        else:
            y = KINDS[self.kind].cpu_product(self, x2)
        y = y[:, : self.out_features].reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def _align_(self) -> None:
        """The loaded (or sliced) buffers replaced by 64-byte aligned copies where they are not (`aligned`)."""
        for name in ("qweight", "scales"):
            t = getattr(self, name)
            if t.data_ptr() % ALIGNMENT or not t.is_contiguous():
                setattr(self, name, aligned(t))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class QuantLowRankLinear(nn.Module):
    """y = up(down(x)) with both factors quantized (QuantLinear)."""

    def __init__(self, in_features: int, out_features: int, rank: int, quant: dict, bias: bool = False,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = QuantLinear(in_features, rank, quant, dtype=dtype)
        self.up = QuantLinear(rank, out_features, quant, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class QuantEmbedding(nn.Module):
    """Embedding rows stored as int8 with one scale per row; `head` multiplies by the same codes."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None):
        super().__init__()
        self.dtype = dtype or torch.bfloat16
        self.table = QuantLinear(embedding_dim, num_embeddings, {"kind": "int8"}, dtype=self.dtype)

    @property
    def weight(self):  # transformers reads the embeddings' dtype and device from .weight
        return self.table.scales

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.qweight[ids].to(self.dtype) * self.table.scales[ids][..., None].to(self.dtype)


class QuantHead(nn.Module):
    """The LM head over the (tied) QuantEmbedding's codes: no tensors of its own."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a child: its tensors are saved once, by the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.table(x)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except a bf16 product of many rows (>= 16: perplexity, prefill) on a CPU without bf16
    instructions, where torch's bf16 product is a slow fallback: float32 over chunks of 1024 weight
    rows, rounded to bf16 once (a bf16 GEMM with float32 accumulation), the numbers ACIP Studio
    computes. Few rows (decode) stay bf16; against a transposed weight (LowRankLinear's up_t.t()) row by
    row through torch.mv, ~10x faster there than torch's general bf16 product, the same bits."""
    if x.dtype is not torch.bfloat16 or not x.is_cpu or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return F.linear(x, weight, bias)
    if x.numel() < 16 * x.shape[-1]:
        if (bias is not None or weight.dim() != 2 or weight.stride(0) != 1 or not weight.t().is_contiguous()
                or not x.numel()):  # a bias: F.linear's own rounding of the sum, which mv + bias does not give
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        y = torch.stack([torch.mv(weight, row) for row in rows]) if len(rows) > 1 else torch.mv(weight, rows[0])[None]
        return y.reshape(*x.shape[:-1], weight.shape[0])
    xf = x.float()
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for i in range(0, weight.shape[0], 1024):
        b = None if bias is None else bias[i:i + 1024].float()
        out[..., i:i + 1024] = F.linear(xf, weight[i:i + 1024].float(), b)
    return out


class Bf16Linear(nn.Linear):
    """An nn.Linear whose products go through bf16_linear (the same class as ACIP Studio's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(x, self.weight, self.bias)


def factorize_(model: nn.Module, ranks: dict, quant: dict | None = None, transposed=()) -> None:
    """Replaces each listed nn.Linear by a LowRankLinear of its rank (same device and dtype), and with
    `quant` every factor and listed dense layer by its quantized form. `transposed` (config
    `acip_transposed`) names GPT-2-style Conv1D layers (weight [in, out]) that ACIP Studio computes,
    and this folder stores, as nn.Linear (weight [out, in]): they are swapped first."""
    def swap(name, new):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

    for name in transposed or ():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):  # Conv1D: y = x·W + b with W [in, out]
            n_in, n_out = old.weight.shape
            swap(name, nn.Linear(n_in, n_out, bias=getattr(old, "bias", None) is not None,
                                 device=old.weight.device, dtype=old.weight.dtype))
    dtype = torch.bfloat16
    for name, rank in (ranks or {}).items():
        old = model.get_submodule(name)
        if isinstance(old, (LowRankLinear, QuantLowRankLinear)):
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"acip_ranks names {name!r}, which is a {type(old).__name__}, not nn.Linear")
        if quant:
            swap(name, QuantLowRankLinear(old.in_features, old.out_features, int(rank), quant,
                                          old.bias is not None, dtype))
        else:
            swap(name, LowRankLinear(old.in_features, old.out_features, int(rank),
                                     old.bias is not None, old.weight.device, old.weight.dtype))
    if quant:
        _quantize_(model, quant, dtype, swap)
    for m in model.modules():  # the same class as ACIP Studio's linears (plain float32 products unchanged)
        if type(m) is nn.Linear:
            m.__class__ = Bf16Linear


def _quantize_(model: nn.Module, quant: dict, dtype: torch.dtype, swap) -> None:
    """Every listed dense layer by its quantized form, and the embedding and head in int8 if listed: a
    tied head reads the embedding's codes, an untied one (`head` "own") has int8 codes of its own."""
    for name in quant.get("dense", []):
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            swap(name, QuantLinear(old.in_features, old.out_features, quant, old.bias is not None, dtype))
    if quant.get("embeddings") == "int8":
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        q = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, dtype)
        model.set_input_embeddings(q)
        if quant.get("head", "tied") == "own":
            model.set_output_embeddings(QuantLinear(head.in_features, head.out_features, {"kind": "int8"},
                                                    head.bias is not None, dtype))
        else:
            model.set_output_embeddings(QuantHead(q))


_CLASSES: dict = {}


# -- attention for one new token: the same function as ACIP Studio's own, so that an export
# decodes with the app's numbers. With no mask, transformers' SDPA passes enable_gqa=True, which on the
# CPU in bf16 is a slow path (61 against 24 µs a layer with 64 cached tokens, 212 against 49 with 300);
# the query heads folded onto their key/value heads (transformers' pack_gqa) take the flash kernel.
ATTENTION = "acip_sdpa_export"  # not the app's name: both may load in one process


def decode_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' sdpa_attention_forward, with the grouped heads folded for one bf16 CPU query."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] == 1 and attention_mask is None and groups > 1 and query.dtype is torch.bfloat16
            and query.is_cpu and not dropout and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None):
        batch, heads, _, dim = query.shape
        out = F.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups, dim), key, value,
                                             scale=scaling)
        return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(ATTENTION, decode_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_decode_attention(model) -> None:
    """A loaded model that runs SDPA switches to decode_sdpa (another choice of the caller's stays)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and model._can_set_attn_implementation():
        model.set_attn_implementation(ATTENTION)


def base_classes(base_model_type: str):
    """(config class, causal-LM class) this transformers has for a base model_type, or a clear error."""
    try:
        base_config = CONFIG_MAPPING[base_model_type]
        return base_config, MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    except (KeyError, ValueError):
        raise ValueError(f"this transformers version has no causal LM of type {base_model_type!r}; "
                         "upgrade transformers") from None


def derived_config(base_config, name: str, model_type: str, doc: str, module: str):
    """The base's config class under our own model_type (what config.json names)."""
    return type(name, (base_config,), {
        "__module__": module,
        "__doc__": doc,
        "model_type": model_type,
        "base_model_tp_plan": None,  # tensor-parallel plans of the base do not fit factorized layers
    })


def classes_for(base_model_type: str):
    """(config class, model class) for a base model_type, built once per process."""
    if base_model_type not in _CLASSES:
        base_config, base_model = base_classes(base_model_type)
        config_cls = derived_config(base_config, CONFIG_PREFIX + base_model_type, MODEL_TYPE_PREFIX + base_model_type,
                                    f"{base_config.__name__} plus `acip_ranks` {{module name: rank}}.", __name__)

        def __init__(self, config, *args, **kwargs):
            base_model.__init__(self, config, *args, **kwargs)
            factorize_(self, getattr(config, "acip_ranks", None), getattr(config, "acip_quant", None),
                       getattr(config, "acip_transposed", None))

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            model = super(model_cls, cls).from_pretrained(*args, **own_dtype(kwargs))
            use_decode_attention(model)
            return model

        model_cls = type(MODEL_PREFIX + base_model_type, (base_model,), {
            "__module__": __name__,
            "__doc__": f"{base_model.__name__} with the layers of config.acip_ranks factorized.",
            "config_class": config_cls,
            "__init__": __init__,
            "from_pretrained": from_pretrained,
        })
        _CLASSES[base_model_type] = (config_cls, model_cls)
    return _CLASSES[base_model_type]


def own_dtype(kwargs: dict) -> dict:
    """from_pretrained's keyword arguments with the export's own dtype (config.json) unless the caller
    names one: 5.x's default, while 4.x's is float32 (a quantized export then fails at its first
    product, a bf16 one runs other numbers than the export's, an any-size bf16 folder is read into
    float32 first: SmolLM2's peaked at 1,276 MB against 1,060 MB under 4.57.6)."""
    if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
        kwargs = dict(kwargs, dtype="auto")
    return kwargs


def __getattr__(name: str):  # ACIPConfig__llama, ACIPForCausalLM__qwen2, ... (named in auto_map)
    for prefix, which in ((CONFIG_PREFIX, 0), (MODEL_PREFIX, 1)):
        if name.startswith(prefix) and len(name) > len(prefix):
            return classes_for(name[len(prefix):])[which]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Precision as the second axis of the family: one `Format` per way of storing a weight.

A Format names how every linear of a materialized model is held and multiplied:
  float32 / bfloat16  plain tensors of that dtype (F.linear);
  int8                weight-only, symmetric, one scale per output channel;
  int4                weight-only, asymmetric, groups of `group_size` along the input axis
                      (a scale and a zero per group), two values per byte.
Activations run in the format's `compute_dtype` (bfloat16 for int8/int4: torch's CPU low-bit
kernels are fast with bf16 activations and 10x slower with fp32 ones; benchmarks/RESULTS.md).
Embeddings / LM head stay in the compute dtype (the paper's choice) unless `embeddings="int8"`.

Bytes are counted from the tensors a `QWeight` holds (data + scales + zeros), so a memory budget is
checked against what the process really holds. The low-rank factors are quantized once, in score
order (materialize.py): a size keeps a prefix of rows of `down` (a view) and a prefix of columns of
`up` (a small copy). For int4 the kept rank (LoRA rows included) moves in steps of the group size:
that makes a column prefix a whole number of groups, and the CPU kernel's packed rows come in
blocks of 32 (every supported group size is a multiple of 32); for int8 in steps of 16 (the kernel's
input size).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from acip_core.formats.kernels import bf16_linear

FORMAT_NAMES = ("float32", "bfloat16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # chosen by measurement (benchmarks/RESULTS.md, "Formats")
EMBEDDING_CHOICES = ("native", "int8")  # native = the compute dtype
LAYOUTS = ("small", "fast")  # int formats: fewest bytes, or a layer factorized only where that is faster
_FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Format:
    """How the linears of a materialized model are stored and multiplied (see module docstring)."""

    name: str = "float32"  # one of FORMAT_NAMES
    group_size: int | None = None  # int4 only: input-axis group length
    embeddings: str = "native"  # "int8": the (tied) embedding / LM head quantized per row too
    layout: str = "small"  # "fast" (int formats): the second kernel call of a low-rank layer charged

    def __post_init__(self):
        if self.name not in FORMAT_NAMES:
            raise ValueError(f"unknown format {self.name!r}; choose one of {list(FORMAT_NAMES)}")
        if self.name == "int4":
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            if self.group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"int4 group size must be one of {list(INT4_GROUP_SIZES)}, got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"{self.name} takes no group size (only int4 does)")
        if self.embeddings not in EMBEDDING_CHOICES:
            raise ValueError(f"embeddings must be one of {list(EMBEDDING_CHOICES)}, got {self.embeddings!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "fast" and not self.quantized:
            raise ValueError(f"only int8 / int4 have a fast layout (their kernels' per-call floor); "
                             f"{self.name} has none")

    # -- identity ---------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """The one string for this format (curve.csv's `format` column, CLI, app, cache keys)."""
        key = self.name + (f"-g{self.group_size}" if self.name == "int4" else "")
        return key + ("+emb8" if self.embeddings == "int8" else "") + ("+fast" if self.layout == "fast" else "")

    def __str__(self) -> str:
        return self.key

    @property
    def quantized(self) -> bool:
        return self.name in ("int8", "int4")

    @property
    def compute_dtype(self) -> torch.dtype:
        return _FLOAT.get(self.name, torch.bfloat16)

    @property
    def rank_step(self) -> int:
        """The kept rank of a factorized layer (LoRA rows included) is a multiple of this: int4 keeps
        whole groups; torch's int8 CPU kernel needs an input size that is a multiple of 16 under its
        AVX-512 code and of 8 under AVX2 (else NaN or a crash; `_INT8_INPUT_MULTIPLE`) — 16 on every
        CPU, so every `up` factor runs the kernel and a size's bytes never depend on the CPU."""
        return {"int4": self.group_size, "int8": 16}.get(self.name, 1)

    @property
    def call_bytes(self) -> int:
        """What a low-rank layer's second kernel call is charged, in bytes read, when choosing between
        its two forms (`prune.LayerShape.format_bytes`). The "small" layout: 0, the paper's byte rule
        (fewest bytes, the best perplexity per GB). The "fast" layout: a call's measured floor, so a
        layer runs factorized only where two calls beat one — never slower than the original in the
        same format, for more bytes at the same size ratio (benchmarks/RESULTS.md, "Per-call charge")."""
        return CALL_BYTES if self.layout == "fast" else 0

    # -- bytes --------------------------------------------------------------------------------------
    @property
    def float_bytes(self) -> int:
        return self.compute_dtype.itemsize

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of one [out, in] weight in this format: data + scales (+ zeros), as QWeight holds it."""
        if self.name == "int8":
            return out_features * in_features + out_features * self.float_bytes
        if self.name == "int4":  # rows padded to the kernel's blocks of 32
            groups = in_features // self.group_for(in_features) if in_features else 0
            rows = -(-out_features // 32) * 32
            return rows * in_features // 2 + 2 * groups * rows * self.float_bytes
        return out_features * in_features * self.float_bytes

    def group_for(self, in_features: int) -> int:
        """int4: the group length used for an input size (the largest supported divisor <= group_size;
        SmolLM2's 576-wide inputs take groups of 64 when 128 is asked)."""
        for g in sorted(INT4_GROUP_SIZES, reverse=True):
            if g <= self.group_size and in_features % g == 0:
                return g
        raise ValueError(f"int4 needs an input size that is a multiple of 32, got {in_features}")

    def kept_rank(self, keep: int, full: int) -> int:
        """Rows a factorized layer really keeps for `keep` wanted (rounded up to the rank step)."""
        step = self.rank_step
        return min(-(-keep // step) * step, full) if keep else 0

    def embedding_bytes(self, rows: int, dim: int) -> int:
        if self.embeddings == "int8":
            return Format("int8").weight_bytes(rows, dim)
        return rows * dim * self.float_bytes

    # -- packing and multiplying -------------------------------------------------------------------
    def pack(self, weight: torch.Tensor, gram: torch.Tensor | None = None) -> "QWeight | torch.Tensor":
        """A [out, in] float weight in this format (a QWeight, or a plain tensor for float formats).
        `gram` (its input's second moment) lets int4 choose its codes by the output's error."""
        if self.name == "int8":
            return quantize_int8(weight, self.compute_dtype)
        if self.name == "int4":
            return quantize_int4(weight, self.group_for(weight.shape[1]), self.compute_dtype, gram=gram)
        return weight.detach().to(self.compute_dtype).contiguous()

    def pack_many(self, weights: list, grams: list | None = None, rows: list | None = None) -> list:
        """`pack` of many weights at once, each padded with zero rows to `rows[i]` (int4 with Grams:
        one batched GPTQ, far faster than one by one)."""
        grams = list(grams) if grams is not None else [None] * len(weights)
        rows = list(rows) if rows is not None else [w.shape[0] for w in weights]
        if self.name != "int4":
            return [self.pack(zero_rows(w, r)) for w, r in zip(weights, rows)]
        by_group: dict[int, list[int]] = {}
        for i, w in enumerate(weights):
            by_group.setdefault(self.group_for(w.shape[1]), []).append(i)
        out = [None] * len(weights)
        for g, idx in by_group.items():
            packs = quantize_int4_many([weights[i] for i in idx], g, self.compute_dtype,
                                       grams=[grams[i] for i in idx], rows=[rows[i] for i in idx])
            for i, p in zip(idx, packs):
                out[i] = p
        return out


def zero_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended up to `rows` (itself when it has them): whole groups or kernel
    blocks for a quantized factor, never used by a kept prefix."""
    pad = rows - weight.shape[0]
    return torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])]) if pad > 0 else weight


def parse_format(spec: "str | Format | None", group_size: int | None = None,
                 embeddings: str | None = None, layout: str | None = None) -> Format:
    """A Format from its key ("int4-g64+emb8+fast"), a name plus options, or a Format (returned as is)."""
    if isinstance(spec, Format):
        return spec
    spec = "float32" if spec is None else str(spec).strip()
    emb, lay = "native", "small"
    if spec.endswith("+fast"):
        spec, lay = spec[:-len("+fast")], "fast"
    if spec.endswith("+emb8"):
        spec, emb = spec[:-len("+emb8")], "int8"
    name, _, group = spec.partition("-g")
    if group:
        if not group.isdigit():
            raise ValueError(f"unknown format {spec!r}")
        if group_size is not None and int(group) != group_size:
            raise ValueError(f"format {spec!r} and group size {group_size} disagree")
        group_size = int(group)
    return Format(name, group_size if name == "int4" else (None if group_size is None else group_size),
                  embeddings or emb, layout or lay)


# -- quantized weights ----------------------------------------------------------------------------
# torch's CPU int8 kernel (`_weight_int8pack_mm`, torch 2.13) crashes the process (SIGSEGV) on an
# AVX-512 CPU when its weight does not start on a 64-byte boundary and it multiplies 16 rows or more
# (a weight read from safetensors at an offset, a slice at an offset); a copy of the same codes works.
# So every tensor a low-bit kernel reads is 64-byte aligned (`aligned`, QWeight.__post_init__), for the
# int4 kernel too (docs/ARCHITECTURE.md, "Format").
ALIGNMENT = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it is contiguous and starts on a 64-byte boundary (or is not on the CPU), else a
    contiguous copy that does."""
    if t.device.type != "cpu" or (t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0):
        return t
    out = t.contiguous().clone()
    if out.data_ptr() % ALIGNMENT:  # the allocator aligns to 64 on x86 builds; never assume it
        nbytes = out.numel() * out.element_size()
        buf = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
        start = -buf.data_ptr() % ALIGNMENT
        out = buf[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)
    return out


@dataclass
class QWeight:
    """A weight-only quantized [out, in] matrix and the kernel that multiplies by it.

    int8: data int8 [out, in], scales [out] (compute dtype); W ≈ data · scales[:, None].
    int4: data packed for the device's kernel (CPU: uint8 [out, in/2]), scales_zeros [in/g, out, 2];
          W ≈ (q − 8) · scale + zero per group, q in 0..15. The codes q are read back from the
          packed bytes on the CPU (`codes()`); only a layout that cannot be read back (CUDA's)
          keeps them unpacked beside it (`q`, 1 byte per weight more).
    """

    kind: str  # "int8" | "int4"
    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple  # (out, in)
    group_size: int | None = None
    q: torch.Tensor | None = field(default=None, repr=False)  # int4 on CUDA: the unpacked codes [out, in] uint8

    def __post_init__(self):  # what the CPU kernels read starts on a 64-byte boundary (`aligned`)
        self.data, self.scales = aligned(self.data), aligned(self.scales)

    @property
    def nbytes(self) -> int:
        """Bytes held for multiplying (what a budget counts; CUDA's unpacked int4 codes aside)."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def scale_rows(self, factor: torch.Tensor) -> "QWeight":
        """The same codes standing for each row times factor[row] (rows past len(factor): 1): the
        quantization of the scaled matrix, as per-row (int8) and per-(row, group) (int4) grids are
        equivariant to a row's scale (formats.int4_balance)."""
        f = F.pad(factor.float(), (0, self.scales.shape[-2 if self.kind == "int4" else 0] - len(factor)), value=1.0)
        if self.kind == "int8":
            return QWeight("int8", self.data, (self.scales.float() * f).to(self.scales.dtype), self.shape)
        scales = (self.scales.float() * f[None, :, None]).to(self.scales.dtype)  # [k/g, rows, 2]: scale, zero
        return QWeight("int4", self.data, scales, self.shape, self.group_size, self.q)

    def rows(self, n: int) -> "QWeight":
        """The first n output rows (int8: a view; int4: n must be a multiple of 32)."""
        out, k = self.shape
        if n == out:
            return self
        if self.kind == "int8":
            return QWeight("int8", self.data[:n], self.scales[:n], (n, k))
        if n % 32:
            raise ValueError(f"int4 rows come in blocks of 32, got {n}")
        block = None if self.data.is_cuda else _int4_cpu_block()
        if block is None:  # a layout that is not read back (CUDA's): repacked from the kept codes
            data = _pack_int4(self.q[:n])
        elif n % block == 0:  # whole blocks: a view
            data = self.data[:n]
        else:  # AVX-512's blocks of 64: the last 32 rows repacked as the smaller last block they become
            whole = n // block * block
            data = torch.cat([self.data[:whole], _pack_int4(_unpack_int4_cpu(self.data[whole:whole + block], k)[: n - whole])])
        return QWeight("int4", data, self.scales[:, :n].contiguous(), (n, k), self.group_size,
                       None if self.q is None else self.q[:n])

    def codes(self) -> torch.Tensor:
        """int4: the codes [rows, in] uint8 (rows padded to 32), unpacked from the CPU layout."""
        if self.q is not None:
            return self.q
        return _unpack_int4_cpu(self.data, self.shape[1])

    def cols(self, n: int) -> "QWeight":
        """The first n input columns (a copy; int4: n must be a whole number of groups)."""
        out, k = self.shape
        if n == k:
            return self
        if self.kind == "int8":
            return QWeight("int8", self.data[:, :n].contiguous(), self.scales, (out, n))
        if n % self.group_size:
            raise ValueError(f"int4 columns come in groups of {self.group_size}, got {n}")
        block = None if self.data.is_cuda else _int4_cpu_block()
        if block is not None:  # a column prefix is a slice of each block's bytes: a copy, no repacking
            rows = self.data.shape[0]
            whole = rows // block * block
            parts = [self.data[:whole].view(whole // block, k, block // 2)[:, :n].reshape(whole, n // 2)]
            if rows > whole:  # the smaller last block
                parts.append(self.data[whole:].reshape(k, -1)[:n].reshape(rows - whole, n // 2))
            data = torch.cat(parts) if rows > whole else parts[0]
        else:
            data = _pack_int4(self.codes()[:, :n])
        return QWeight("int4", data, self.scales[: n // self.group_size].contiguous(), (out, n), self.group_size,
                       None if self.q is None else self.q[:, :n])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype (the compute dtype); differentiable in x."""
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenProduct.apply(x, self)
        return self._product(x)

    # A decode step calls this ~300 times for one row each: the kernel itself takes ~15 µs, so every
    # Python step around it counts (benchmarks/RESULTS.md, "Per-call cost"). Hence 2-D inputs pass
    # through untouched, the CPU kernels are tested first, and a slice is taken only when the kernel
    # returned padded rows.
    def _product(self, x: torch.Tensor) -> torch.Tensor:
        out, k = self.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        if not out or not k:  # a factor of rank 0 (no LoRA, nothing kept)
            y = x2.new_zeros(x2.shape[0], out)
        elif x2.is_cpu:
            if self.kind == "int4":
                y = _INT4_CPU(x2.contiguous(), self.data, self.group_size, self.scales)
            elif k % _INT8_INPUT_MULTIPLE == 0:
                y = _INT8_CPU(x2.contiguous(), self.data, self.scales)
            else:  # an `up` factor whose rank is not a multiple of the kernel's input step: the codes cast
                # to bf16 (exact) and the scale after the product, as the kernel and the export do (half
                # the memory traffic of dequantizing first)
                y = bf16_linear(x2, self.data.to(x2.dtype)) * self.scales
        elif x2.is_cuda:
            y = _cuda_product(self, x2)
        else:  # other accelerators: the reference product (correct; not a fast kernel)
            y = F.linear(x2, self.dequantize().to(x2.device, x2.dtype))
        if y.shape[1] != out:  # int4's rows padded to the kernel's blocks of 32
            y = y[:, :out]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The float32 matrix these codes stand for (the oracle for tests and dense exports), or its
        rows [start, stop) only (int4 on the CPU: start a multiple of 32, its packed row blocks)."""
        out, k = self.shape
        stop = out if stop is None else min(stop, out)
        if self.kind == "int8":
            return self.data[start:stop].float() * self.scales[start:stop].float()[:, None]
        if self.q is not None:
            q = self.q[start:stop]
        else:  # CPU layout: whole blocks unpack alone
            if start % 32:
                raise ValueError(f"int4 rows unpack in blocks of 32, got start {start}")
            block = _int4_cpu_block()
            first = start // block * block
            q = _unpack_int4_cpu(self.data[first:-(-stop // block) * block], k)[start - first: stop - first]
        rows, g = q.shape[0], self.group_size
        sz = self.scales[:, start:stop].float()  # [k/g, rows, 2]
        scale, zero = sz[..., 0].t()[:, :, None], sz[..., 1].t()[:, :, None]  # [rows, k/g, 1]
        return ((q.float().reshape(rows, k // g, g) - 8) * scale + zero).reshape(rows, k)


class _FrozenProduct(torch.autograd.Function):
    """x·Wᵀ by a frozen QWeight with a gradient for x only: fine-tuning a quantized size (finetune.py)
    sends gradients through its frozen quantized layers to the LoRAs below them. The low-bit kernels
    have no backward; ∂L/∂x = ∂L/∂y·W with W dequantized for that product only (never kept)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return weight._product(x)

    @staticmethod
    def backward(ctx, grad):
        # in float32: a bf16 GEMM is 10-50x slower on CPUs without bf16 instructions (avx2 only here);
        # W in blocks of rows, so no float32 copy of a whole factor is ever held (the step's peak)
        w, g = ctx.weight, grad.float()
        out = w.shape[0]
        dx = g.new_zeros(*g.shape[:-1], w.shape[1]) if out == 0 else None
        for start in range(0, out, _BACKWARD_ROWS):
            part = g[..., start:start + _BACKWARD_ROWS] @ w.dequantize(start, start + _BACKWARD_ROWS).to(g.device)
            dx = part if dx is None else dx.add_(part)
        return dx.to(grad.dtype), None


# Format.call_bytes of the "fast" layout. A product by torch's low-bit CPU kernels (with our Python
# around it) takes about a + bytes/bandwidth (batch 1, weights cold): a·bandwidth = 110 KB (int8) and
# 147 KB (int4) on the Zen 5, ≈ 130 KB on the Zen 3 (benchmarks/call_floor.py; benchmarks/RESULTS.md,
# "Per-call charge"); rounded up, so a near-tie runs dense (the original's weight). Module level, so
# tests on tiny models, whose layers are far below it, set it to 0 and still reach the low-rank form
# (tests/conftest.py).
CALL_BYTES = 160_000

_INT4_CPU = torch.ops.aten._weight_int4pack_mm_for_cpu  # torch's CPU kernels (looked up once)
_INT8_CPU = torch.ops.aten._weight_int8pack_mm
# The input sizes torch's CPU int8 kernel multiplies correctly: multiples of 8 (it crashes the process
# otherwise), and of 16 where torch runs its AVX-512 code: there 8 mod 16 gives NaN for one row and
# crashes for more (measured on a Zen 5 with torch 2.13: benchmarks/RESULTS.md "Kernels"). int8 ranks
# move in steps of 16, so only a dense layer of another model's odd input size takes the codes-cast
# product. A constant, not a call: `_product` runs ~400 times a decode step.
_INT8_INPUT_MULTIPLE = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


_BACKWARD_ROWS = 256  # rows of a frozen factor dequantized at once in the backward (a multiple of 32)


def quantize_int8(weight: torch.Tensor, dtype=torch.bfloat16) -> QWeight:
    """Symmetric per-output-channel int8 (round to nearest)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    scale = scale.to(dtype).float()  # the kernel applies the scale in the compute dtype
    data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return QWeight("int8", data.contiguous(), scale.to(dtype).contiguous(), tuple(w.shape))


# clipping ratios tried per group: shrinking the [min, max] range trades a few clipped outliers for
# a finer grid; the best per group (least squared error) is kept (RESULTS.md "int4 quantizer")
_INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.bfloat16,
                  clips=_INT4_CLIPS, gram: torch.Tensor | None = None) -> QWeight:
    """Asymmetric int4 in groups along the input axis, with a per-group clipping search.

    With `gram` (the layer input's second moment E[x xᵀ], [in, in]) the codes are chosen GPTQ-style:
    input columns left to right, each column's rounding error spread over the columns not yet
    rounded so that the *output* error E‖ΔW x‖² is small, not the weights' own (ARCHITECTURE.md,
    "int4 quantizer"). Rows are independent either way, so a row prefix stays a valid quantization."""
    return quantize_int4_many([weight], group_size, dtype, clips, None if gram is None else [gram])[0]


_GPTQ_BATCH = 16  # weights quantized together by GPTQ (one Python step per column for all of them)


def quantize_int4_many(weights: list, group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.bfloat16,
                       clips=_INT4_CLIPS, grams: list | None = None, rows: list | None = None) -> list[QWeight]:
    """`quantize_int4` of many weights (each with its Gram, or None: round to nearest), each padded
    with zero rows to `rows[i]` (default: its own rows). GPTQ runs batched over weights of the same
    input size: a model's worth of layers in a few thousand Python steps instead of one per column of
    every layer. Padded copies exist for one batch at a time only."""
    grams = list(grams) if grams is not None else [None] * len(weights)
    rows = list(rows) if rows is not None else [w.shape[0] for w in weights]
    for w in weights:
        if w.shape[1] % group_size:
            raise ValueError(f"int4 needs the input size ({w.shape[1]}) to be a multiple of the group size {group_size}")

    def padded(i, to=None):  # float32, zero rows up to `to` (default: the kernel's blocks of 32)
        return zero_rows(weights[i].detach().float(), to or -(-rows[i] // 32) * 32)

    out: list = [None] * len(weights)
    batches: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        if g is not None:
            batches.setdefault(weights[i].shape[1], []).append(i)
            continue
        w = padded(i)
        wg = w.reshape(w.shape[0], -1, group_size)
        scale, zero = _int4_grid(wg, dtype, clips)
        q = _int4_round(wg, scale, zero)
        out[i] = _int4_qweight((rows[i], w.shape[1]), q, scale, zero, group_size, dtype)
    for idx in batches.values():
        for start in range(0, len(idx), _GPTQ_BATCH):
            chunk = idx[start:start + _GPTQ_BATCH]
            n = [-(-rows[i] // 32) * 32 for i in chunk]
            w = torch.stack([padded(i, max(n)) for i in chunk])
            q, scale, zero = _int4_gptq(w, torch.stack([grams[i].to(w.device) for i in chunk]), group_size, dtype, clips)
            for b, i in enumerate(chunk):
                out[i] = _int4_qweight((rows[i], w.shape[2]), q[b, :n[b]], scale[b, :n[b]], zero[b, :n[b]],
                                       group_size, dtype)
    return out


# exponents tried by int4_balance: 0 leaves the factors as they are
INT4_BALANCE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def int4_balance(down: torch.Tensor, up_t: torch.Tensor, gram: torch.Tensor,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.bfloat16) -> torch.Tensor:
    """Per-rank scales c [r] for the factors of y = up_tᵀ·(down·x): `down`'s rows / c and `up_t`'s rows · c
    give the same product, and int4's groups along `up`'s rank axis then spend their precision where the
    output error is. `up`'s input down·x has second moment M = down·G·downᵀ (G = `gram`, the layer
    input's), steep along the rank (the singular directions' energies); c = s^α with s² = diag(M),
    normalized per group, α per group of `group_size` rank rows from INT4_BALANCE_ALPHAS by that group's
    output error Σ e²·s² once rounded (activation-aware scaling as in AWQ, Lin et al. 2024, searched on
    the output error). Groups round independently, so the choice is the best one for every size's
    prefix of whole groups at once. `down`'s rows are quantized independently, so a row's scale leaves
    its codes as they were (`QWeight.scale_rows`)."""
    d, u = down.detach().float(), up_t.detach().float().t()  # [r, in], [out, r]
    s2 = ((d @ gram.to(d.device, torch.float32)) * d).sum(1).clamp_min(0)  # diag(M) [r]
    live = s2 > 0
    r, pad = u.shape[1], -(-u.shape[1] // group_size) * group_size - u.shape[1]  # whole groups along the rank
    groups = (r + pad) // group_size
    s2g, liveg = F.pad(s2, (0, pad)).reshape(groups, group_size), F.pad(live, (0, pad)).reshape(groups, group_size)
    ug = F.pad(u, (0, pad)).reshape(u.shape[0], groups, group_size)
    best_err, best_c = None, None
    for alpha in INT4_BALANCE_ALPHAS:
        c = torch.where(liveg, s2g.clamp_min(1e-30) ** (alpha / 2), torch.ones_like(s2g))  # [groups, g]
        logc = torch.where(liveg, c.log(), torch.zeros_like(c))
        c = c / (logc.sum(1, keepdim=True) / liveg.sum(1, keepdim=True).clamp_min(1)).exp()  # per group: geo-mean 1
        wg = ug * c
        scale, zero = _int4_grid(wg, dtype, _INT4_CLIPS)
        deq = ((_int4_round(wg, scale, zero) - 8) * scale + zero) / c
        err = ((deq - ug) ** 2 * s2g).sum(0).sum(-1)  # [groups]: each group's output error (diagonal moment)
        if best_err is None:
            best_err, best_c = err, c
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_c = torch.where(better[:, None], c, best_c)
    return best_c.reshape(-1)[:r]


def _int4_qweight(shape, q, scale, zero, group_size, dtype) -> QWeight:
    """A QWeight from codes q [rows, k/g, g] (rows padded to 32) and scale, zero [rows, k/g, 1]."""
    codes = q.to(torch.uint8).reshape(q.shape[0], -1)
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()  # [k/g, out, 2]
    data = _pack_int4(codes)
    keep = codes.is_cuda or _int4_cpu_block() is None  # a layout that cannot be read back keeps the codes
    return QWeight("int4", data, sz.to(dtype), tuple(shape), group_size, codes if keep else None)


def _int4_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int4 codes 0..15 of w on the grid (scale, zero): w ≈ (q − 8)·scale + zero."""
    return torch.round((w - zero) / scale + 8).clamp(0, 15)


def _int4_grid(wg: torch.Tensor, dtype, clips, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group of `wg` [rows, groups, g] with the least squared rounding error among
    the clipping ratios (stored: w = (q − 8)·scale + zero); `weight` (broadcast to wg) weighs the
    entries' errors."""
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    mid = (lo + hi) / 2
    best_err = best = None
    for c in clips:
        scale = ((hi - lo) * c / 15).clamp_min(1e-8).to(dtype).float()
        zero = (mid - (hi - lo) * c / 2 + 8 * scale).to(dtype).float()
        q = _int4_round(wg, scale, zero)
        err = ((q - 8) * scale + zero - wg).pow(2)
        err = (err if weight is None else err * weight).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, (scale, zero)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = tuple(torch.where(better, new, old) for new, old in zip((scale, zero), best))
    return best


GPTQ_DAMP = 0.01  # ridge on the Gram, relative to its mean diagonal (the GPTQ paper's default)


def _int4_gptq(w: torch.Tensor, gram: torch.Tensor, g: int, dtype, clips):
    """GPTQ (Frantar et al., 2023) with static groups, batched: codes q [B, rows, k/g, g] and scale,
    zero [B, rows, k/g, 1] of the weights w [B, rows, k] under the input Grams [B, k, k]."""
    batch, rows, k = w.shape
    w = w.clone()
    h = gram.double()
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: edits reach h
    dead = diag <= 0  # inputs that never fire: their weights do not matter
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += GPTQ_DAMP * diag.mean(-1, keepdim=True)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty_like(w)
    scales, zeros = [], []
    for g0 in range(0, k, g):
        block = w[..., g0:g0 + g]  # a view: updated in place as its columns are rounded
        hb = hinv[:, g0:g0 + g, g0:g0 + g]
        # the grid weighs each column's error as GPTQ's objective does: by 1 / [H⁻¹ chol]_jj²
        importance = hb.diagonal(dim1=-2, dim2=-1).pow(-2)[:, None, None, :]  # [B, 1, 1, g]
        scale, zero = (t[..., 0, :] for t in _int4_grid(block[..., None, :], dtype, clips, importance))
        errors = torch.empty_like(block)
        for j in range(g):
            col = block[..., j:j + 1]
            qj = _int4_round(col, scale, zero)
            e = (col - ((qj - 8) * scale + zero)) / hb[:, j, j, None, None]
            block[..., j + 1:] -= e * hb[:, None, j, j + 1:]
            q[..., g0 + j:g0 + j + 1], errors[..., j:j + 1] = qj, e
        w[..., g0 + g:] -= errors @ hinv[:, g0:g0 + g, g0 + g:]
        scales.append(scale)
        zeros.append(zero)
    groups = k // g
    return (q.reshape(batch, rows, groups, g), torch.stack(scales, 2).reshape(batch, rows, groups, 1),
            torch.stack(zeros, 2).reshape(batch, rows, groups, 1))


@functools.lru_cache(maxsize=1)
def _int4_cpu_block() -> int | None:
    """Rows per block of torch's CPU int4 layout as `_unpack_int4_cpu` reads it: 32 where torch runs
    its AVX2 code, 64 where it runs its AVX-512 code (torch 2.13). Checked once per process on a probe
    with whole blocks of either and a smaller last block; None where neither reads back (then the
    codes are kept beside the packed bytes, and prefixes are repacked from them)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (96, 128), generator=g, dtype=torch.int32)
    packed = _pack_int4(codes)
    for block in (32, 64):
        try:
            if torch.equal(_unpack_int4_cpu(packed, 128, block), codes.to(torch.uint8)):
                return block
        except RuntimeError:
            pass
    return None


def _unpack_int4_cpu(data: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """The codes [rows, k] uint8 of CPU-packed int4 rows that start at a block boundary. The layout
    (measured on torch 2.13): rows in blocks of `block` (32: AVX2 code; 64: AVX-512 code); within a
    block, block/2 bytes per column, byte j holding row j (low nibble) and row j + block/2; a last
    block of fewer rows holds, per column, consecutive rows two per byte, the even one low."""
    block = block or _int4_cpu_block()
    rows = data.shape[0]
    whole = rows // block * block
    b = data[:whole].reshape(whole // block, k, block // 2)  # [block, column, byte]
    parts = [torch.cat([b & 0xF, b >> 4], dim=2).transpose(1, 2).reshape(whole, k)]
    if rows > whole:
        t = data[whole:].reshape(k, (rows - whole) // 2)
        parts.append(torch.stack([t & 0xF, t >> 4], dim=2).reshape(k, rows - whole).t())
    return torch.cat(parts) if rows > whole else parts[0]


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, k] (0..15) in the layout of the device's int4 kernel (k/2 bytes per row either way)."""
    if codes.is_cuda:
        pairs = _int4_pairs(codes)
        tiles = _cuda_int4_tiles(codes.shape[1])
        if tiles and _cuda_int4_kernel(codes.device):
            return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        return pairs  # no kernel for this shape or GPU: the bytes are held, the product is the reference
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


# -- CUDA: the kernels gpt-fast uses (docs/ARCHITECTURE.md "Formats") ------------------------------
def _int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, k] as uint8 [rows, k/2], two per byte, even column in the high nibble (the input
    of torch's CUDA int4 packing)."""
    return (codes[:, ::2].to(torch.uint8) << 4 | codes[:, 1::2].to(torch.uint8)).contiguous()


def _cuda_int4_tiles(k: int) -> int:
    """The inner k-tiles of torch's CUDA int4 layout for an input size (0: none fits)."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), 0)


@functools.lru_cache(maxsize=None)
def _cuda_int4_kernel(device: torch.device) -> bool:
    """Whether torch's CUDA int4 kernel (`_weight_int4pack_mm`, the tinygemm one: Ampere and later)
    runs on this GPU and matches the dequantized product on a probe; checked once per device."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        codes = torch.randint(0, 16, (64, 128), generator=g, device=device, dtype=torch.int32)
        sz = torch.rand(4, 64, 2, generator=g, device=device).to(torch.bfloat16)
        pairs = _int4_pairs(codes)
        x = torch.randn(5, 128, generator=g, device=device).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(x, torch.ops.aten._convert_weight_to_int4pack(pairs, 8), 32, sz)
        w = QWeight("int4", pairs, sz, (64, 128), 32, codes.to(torch.uint8)).dequantize()
        ref = x.float() @ w.t()
        return bool((y.float() - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3)
    except (RuntimeError, NotImplementedError):
        return False


def _cuda_product(w: "QWeight", x2: torch.Tensor) -> torch.Tensor:
    """x2 [m, in] · Wᵀ on a GPU. int8: the codes cast to the activations' dtype, the scale applied to
    the product (gpt-fast's int8 form; no float copy of W is kept). int4: torch's CUDA int4 kernel
    where it runs (_pack_int4 chose its layout), else the dequantized reference."""
    if w.kind == "int8":
        return F.linear(x2, w.data.to(x2.dtype)) * w.scales.to(x2.dtype)
    if w.data.dtype == torch.int32:  # the kernel's layout
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), w.data, w.group_size,
                                               w.scales.to(torch.bfloat16))
        return y.to(x2.dtype)
    return F.linear(x2, w.dequantize().to(x2.dtype))


def weight_nbytes(w) -> int:
    if isinstance(w, QWeight):
        return w.nbytes
    return w.numel() * w.element_size()


# -- modules ----------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """y = x·Wᵀ + b with W a QWeight (a dense layer, or the LM head, in a quantized format)."""

    def __init__(self, weight: QWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight, self.bias = weight, bias  # plain attributes: frozen, shared, never trained
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.matmul(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qweight.kind}"


class QuantLowRankLinear(nn.Module):
    """y = up·(down·x) + b with both factors quantized (down [r, in] rows, up [out, r] columns)."""

    def __init__(self, down: QWeight, up: QWeight, bias: torch.Tensor | None = None):
        super().__init__()
        # plain attributes, set past Module.__setattr__ (200 layers a new size: ~8 ms through it);
        # frozen and shared like QuantLinear's (a bias here is the family's tensor, never a Parameter)
        self.__dict__.update(down=down, up=up, bias=bias, in_features=down.shape[1], out_features=up.shape[0])

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # flattened once for both products
        y = self.up.matmul(self.down.matmul(x2))
        y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, {self.down.kind}"


class QuantEmbedding(nn.Module):
    """An embedding lookup over an int8 per-row QWeight (shared with a tied QuantLinear head)."""

    def __init__(self, weight: QWeight, dtype: torch.dtype, padding_idx=None):
        super().__init__()
        self.qweight, self.dtype, self.padding_idx = weight, dtype, padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight.dtype/.device of the embeddings
        return self.qweight.scales

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.data[ids].to(self.dtype)
        return rows * self.qweight.scales[ids].to(self.dtype)[..., None]

"""What every quantized format shares: a 64-byte aligned `QWeight` base (its per-format subclasses live
in the format's own module), the frozen product's backward, and the modules that hold QWeights.

A QWeight is a weight-only quantized [out, in] matrix and the kernel that multiplies by it. Each format
family subclasses it (`class Int8Weight(QWeight, kind="int8")`) and owns its prefixes (`rows`, `cols`),
row scaling, kernel call (`_cpu_product`, `_cuda_product`), dequantization and the tensors an export
writes (`portable`); `QWeight(kind, ...)` builds the subclass registered for that kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

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


def zero_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended up to `rows` (itself when it has them): whole groups or kernel
    blocks for a quantized factor, never used by a kept prefix."""
    pad = rows - weight.shape[0]
    return torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])]) if pad > 0 else weight


@dataclass
class QWeight:
    """A weight-only quantized [out, in] matrix (see the module docstring); `kind` names its format
    family, `data` its codes in the kernel's layout, `scales` what turns codes into weights."""

    kind: str
    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple  # (out, in)
    group_size: int | None = None
    q: torch.Tensor | None = field(default=None, repr=False)  # int4 on CUDA: the unpacked codes [out, in] uint8

    KINDS: ClassVar[dict] = {}  # kind -> its subclass (filled by __init_subclass__)

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            QWeight.KINDS[kind] = cls

    def __new__(cls, kind: str | None = None, *args, **kwargs):
        if cls is QWeight and kind is not None:  # QWeight("int8", ...) is an Int8Weight
            if kind not in QWeight.KINDS:
                raise ValueError(f"no quantized weight of kind {kind!r}; known: {sorted(QWeight.KINDS)}")
            cls = QWeight.KINDS[kind]
        return object.__new__(cls)

    def __post_init__(self):  # what the CPU kernels read starts on a 64-byte boundary (`aligned`)
        self.data, self.scales = aligned(self.data), aligned(self.scales)

    @property
    def nbytes(self) -> int:
        """Bytes held for multiplying (what a budget counts; CUDA's unpacked int4 codes aside)."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

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
            y = self._cpu_product(x2)
        elif x2.is_cuda:
            y = self._cuda_product(x2)
        else:  # other accelerators: the reference product (correct; not a fast kernel)
            y = F.linear(x2, self.dequantize().to(x2.device, x2.dtype))
        if y.shape[1] != out:  # rows padded to a kernel's blocks
            y = y[:, :out]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out)

    def cpu_kernel(self):
        """`x2 -> y` for a contiguous 2-D CPU input that wants no gradient: the CPU kernel with this
        weight's tensors bound, or None where that is not one plain call (padded rows, a fallback
        product, the weight on a GPU). A decode step makes ~400 products of one row each; the modules
        below call this once per layer and skip `matmul`'s checks on every token (benchmarks/RESULTS.md,
        "The formats' decode speed on an AVX2 CPU")."""
        return None

    # -- what each family's subclass owns ---------------------------------------------------------
    def _cpu_product(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _cuda_product(self, x2: torch.Tensor) -> torch.Tensor:
        """The dequantized reference; a family with a GPU kernel overrides it."""
        return F.linear(x2, self.dequantize().to(x2.dtype))

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The float32 matrix these codes stand for (the oracle for tests and dense exports), or its
        rows [start, stop) only."""
        raise NotImplementedError

    def rows(self, n: int) -> "QWeight":
        """The first n output rows."""
        raise NotImplementedError

    def cols(self, n: int) -> "QWeight":
        """The first n input columns."""
        raise NotImplementedError

    def scale_rows(self, factor: torch.Tensor) -> "QWeight":
        """The same codes standing for each row times factor[row] (rows past len(factor): 1)."""
        raise NotImplementedError

    def portable(self) -> dict:
        """The tensors an export writes for this weight (what the export template's loader for this
        kind reads: export/template/modeling_acip.py, KINDS)."""
        return {"qweight": self.data.contiguous(), "scales": self.scales.contiguous()}


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


_BACKWARD_ROWS = 256  # rows of a frozen factor dequantized at once in the backward (a multiple of 32)


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
        self._kernel = weight.cpu_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.is_cpu and not x.requires_grad:  # inference: one plain call
            y = self._kernel(x.reshape(-1, self.in_features).contiguous())
            y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        else:
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
        down_kernel, up_kernel = down.cpu_kernel(), up.cpu_kernel()
        self.__dict__["_kernels"] = None if down_kernel is None or up_kernel is None else (down_kernel, up_kernel)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # flattened once for both products
        if self._kernels is not None and x2.is_cpu and not x2.requires_grad:  # inference: two plain calls
            y = self._kernels[1](self._kernels[0](x2.contiguous()))
        else:
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

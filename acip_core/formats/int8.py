"""int8: weight-only, symmetric, one scale per output channel (compute dtype); W ≈ data · scales[:, None].

Kept ranks move in steps of 16 (the CPU kernel's input size, below). A row prefix is a view, a column
prefix a small copy (formats.registry, "Format")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from acip_core.formats.family import Family
from acip_core.formats.kernels import bf16_linear
from acip_core.formats.qweight import QWeight

_INT8_CPU = torch.ops.aten._weight_int8pack_mm  # torch's CPU kernel (looked up once)
# The input sizes torch's CPU int8 kernel multiplies correctly: multiples of 8 (it crashes the process
# otherwise), and of 16 where torch runs its AVX-512 code: there 8 mod 16 gives NaN for one row and
# crashes for more (measured on a Zen 5 with torch 2.13: benchmarks/RESULTS.md "Kernels"). int8 ranks
# move in steps of 16, so only a dense layer of another model's odd input size takes the codes-cast
# product. A constant, not a call: `_product` runs ~400 times a decode step.
_INT8_INPUT_MULTIPLE = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


class Int8Weight(QWeight, kind="int8"):
    """data int8 [out, in], scales [out] (compute dtype)."""

    def scale_rows(self, factor: torch.Tensor) -> "QWeight":
        # per-row grids are equivariant to a row's scale (formats.int4.int4_balance)
        f = F.pad(factor.float(), (0, self.scales.shape[0] - len(factor)), value=1.0)
        return Int8Weight("int8", self.data, (self.scales.float() * f).to(self.scales.dtype), self.shape)

    def rows(self, n: int) -> "QWeight":
        """The first n output rows (a view)."""
        return self if n == self.shape[0] else Int8Weight("int8", self.data[:n], self.scales[:n], (n, self.shape[1]))

    def cols(self, n: int) -> "QWeight":
        """The first n input columns (a copy)."""
        out, k = self.shape
        return self if n == k else Int8Weight("int8", self.data[:, :n].contiguous(), self.scales, (out, n))

    def _cpu_product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.shape[1] % _INT8_INPUT_MULTIPLE == 0:
            return _INT8_CPU(x2.contiguous(), self.data, self.scales)
        # an `up` factor whose rank is not a multiple of the kernel's input step: the codes cast to bf16
        # (exact) and the scale after the product, as the kernel and the export do (half the memory
        # traffic of dequantizing first)
        return bf16_linear(x2, self.data.to(x2.dtype)) * self.scales

    def cpu_kernel(self):
        out, k = self.shape
        if self.data.is_cuda or not out or not k or k % _INT8_INPUT_MULTIPLE:
            return None
        op, data, scales = _INT8_CPU.default, self.data, self.scales
        return lambda x2: op(x2, data, scales)

    def _cuda_product(self, x2: torch.Tensor) -> torch.Tensor:
        """The codes cast to the activations' dtype, the scale applied to the product (gpt-fast's int8
        form; no float copy of W is kept)."""
        return F.linear(x2, self.data.to(x2.dtype)) * self.scales.to(x2.dtype)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        return self.data[start:stop].float() * self.scales[start:stop].float()[:, None]


def quantize_int8(weight: torch.Tensor, dtype=torch.bfloat16) -> QWeight:
    """Symmetric per-output-channel int8 (round to nearest)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    scale = scale.to(dtype).float()  # the kernel applies the scale in the compute dtype
    data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight("int8", data.contiguous(), scale.to(dtype).contiguous(), tuple(w.shape))


class Int8Family(Family):
    name, dash, marker = "int8", "dot", "diamond"

    def rank_step(self, format) -> int:
        """torch's int8 CPU kernel needs an input size that is a multiple of 16 under its AVX-512 code
        and of 8 under AVX2 (else NaN or a crash; `_INT8_INPUT_MULTIPLE`) — 16 on every CPU, so every
        `up` factor runs the kernel and a size's bytes never depend on the CPU."""
        return 16

    def weight_bytes(self, format, out_features: int, in_features: int) -> int:
        return out_features * in_features + out_features * self.compute_dtype(format).itemsize

    def pack(self, format, weight: torch.Tensor, gram: torch.Tensor | None = None) -> QWeight:
        return quantize_int8(weight, self.compute_dtype(format))

    def export_quant(self, format) -> dict:
        return dict(kind="int8", group_size=None)

    def tensor_layout(self, format) -> str:
        return ("`<layer>.down.qweight` [rank, in] and `<layer>.up.qweight` [out, rank], int8 codes, each "
                "with `scales` [rows] (one per row); y = up(down(x)) (+ `<layer>.up.bias`).")


INT8 = Int8Family()
FAMILIES = (INT8,)

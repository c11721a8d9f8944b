"""float8: weight-only e4m3 codes (torch.float8_e4m3fn), one float32 scale per output channel;
W ≈ data · scales[:, None], |data| <= 448 (e4m3's largest finite value).

Bytes: 1 a weight + 4 a row. Kept ranks move in steps of 16 (the fp8 matrix units' input multiple).
A row prefix is a view, a column prefix a small copy, as int8's.

The product: on a GPU with fp8 matrix units (compute capability 8.9 or later) `torch._scaled_mm`
multiplies the codes by the activations quantized to e4m3 per row (a row scale each), with the
weight's row scales applied by the kernel; checked once per device on a probe against the
dequantized product (`_fp8_kernel`). Elsewhere (CPUs, older GPUs, shapes the kernel refuses): the
codes cast to the activations' dtype (exact: e4m3 has 3 mantissa bits, bfloat16 7), the product in
that dtype (formats.kernels.bf16_linear), the row scales applied to the product.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from acip_core.formats.family import Family
from acip_core.formats.kernels import bf16_linear
from acip_core.formats.qweight import QWeight

CODE_DTYPE = torch.float8_e4m3fn
CODE_MAX = torch.finfo(CODE_DTYPE).max  # 448
_KERNEL_MULTIPLE = 16  # torch._scaled_mm needs input and output sizes that are multiples of 16


class Float8Weight(QWeight, kind="float8"):
    """data float8_e4m3fn [out, in], scales float32 [out]."""

    def scale_rows(self, factor: torch.Tensor) -> "QWeight":
        f = F.pad(factor.float(), (0, self.scales.shape[0] - len(factor)), value=1.0)
        return Float8Weight("float8", self.data, self.scales * f, self.shape)

    def rows(self, n: int) -> "QWeight":
        """The first n output rows (a view)."""
        return self if n == self.shape[0] else Float8Weight("float8", self.data[:n], self.scales[:n], (n, self.shape[1]))

    def cols(self, n: int) -> "QWeight":
        """The first n input columns (a copy)."""
        out, k = self.shape
        return self if n == k else Float8Weight("float8", self.data[:, :n].contiguous(), self.scales, (out, n))

    def _cpu_product(self, x2: torch.Tensor) -> torch.Tensor:
        y = bf16_linear(x2, self.data.to(x2.dtype))
        return (y.float() * self.scales).to(x2.dtype)

    def _cuda_product(self, x2: torch.Tensor) -> torch.Tensor:
        out, k = self.shape
        if out % _KERNEL_MULTIPLE or k % _KERNEL_MULTIPLE or not _fp8_kernel(x2.device):
            return (F.linear(x2, self.data.to(x2.dtype)).float() * self.scales).to(x2.dtype)
        return _scaled_product(x2, self.data, self.scales).to(x2.dtype)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        return self.data[start:stop].float() * self.scales[start:stop, None]


def quantize_float8(weight: torch.Tensor) -> QWeight:
    """e4m3 codes of each row scaled to its largest magnitude (round to nearest, as torch casts)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / CODE_MAX).clamp_min(1e-12)
    data = (w / scale[:, None]).clamp(-CODE_MAX, CODE_MAX).to(CODE_DTYPE)
    return Float8Weight("float8", data.contiguous(), scale.contiguous(), tuple(w.shape))


def _scaled_product(x2: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 [m, in] · (data · scales)ᵀ by torch._scaled_mm: x2 quantized to e4m3 per row, bf16 out."""
    xs = (x2.float().abs().amax(dim=1, keepdim=True) / CODE_MAX).clamp_min(1e-12)
    xq = (x2.float() / xs).clamp(-CODE_MAX, CODE_MAX).to(CODE_DTYPE)
    return torch._scaled_mm(xq, data.t(), scale_a=xs, scale_b=scales[None, :].float(), out_dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _fp8_kernel(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs on this GPU (fp8 matrix units: compute capability >= 8.9) with
    row-wise scales and matches the dequantized product on a probe; checked once per device."""
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        w = quantize_float8(torch.randn(64, 128, generator=g, device=device))
        x = torch.randn(5, 128, generator=g, device=device).to(torch.bfloat16)
        y = _scaled_product(x, w.data, w.scales).float()
        ref = x.float() @ w.dequantize().t()
        return bool((y - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class Float8Family(Family):
    name, dash, marker = "float8", "longdash", "x"

    def rank_step(self, format) -> int:
        return _KERNEL_MULTIPLE

    def weight_bytes(self, format, out_features: int, in_features: int) -> int:
        return out_features * in_features + 4 * out_features

    def pack(self, format, weight: torch.Tensor, gram: torch.Tensor | None = None) -> QWeight:
        return quantize_float8(weight)

    def tensor_layout(self, format) -> str:
        return ("`<layer>.down.qweight` [rank, in] and `<layer>.up.qweight` [out, rank], float8 (e4m3) codes, "
                "each with `scales` [rows] (float32, one per row); y = up(down(x)) (+ `<layer>.up.bias`).")


FLOAT8 = Float8Family()
FAMILIES = (FLOAT8,)

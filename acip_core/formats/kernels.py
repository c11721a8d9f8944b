"""The bf16 product every bf16 layer goes through (docs/ARCHITECTURE.md, step 6: formats)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except a bf16 product of many rows (>= FLOAT32_ROWS: perplexity, lm-eval, prefill) on a
    CPU without bf16 instructions (avx2; torch's mkldnn check): there torch's bf16 product is a slow
    fallback (≈ 4 ms a row against the 49,152-row LM head; a 1024 x 576 by 576 x 1536 product 1454 ms
    against 21 ms in float32: benchmarks/RESULTS.md, "The LM head"), so the product runs in float32
    over chunks of CHUNK_ROWS weight rows and is rounded to bf16 once: a bf16 GEMM with float32
    accumulation, the arithmetic of bf16 GEMMs on CPUs and GPUs that have them. Few rows (decode) keep
    the bf16 product, where converting the weight costs more than it saves; against a transposed weight
    (a low-rank layer's `up_t.t()`) they go row by row through torch.mv: torch's bf16 product of a row
    by a transposed matrix is a slow general path there (a 1 x 256 by 256 x 1536 product 617 µs, 55.7 µs
    through mv, the same bits), the per-token cost that made bf16 sizes decode slower than the bf16
    original (benchmarks/RESULTS.md, "The formats' decode speed on an AVX2 CPU")."""
    if x.dtype is not torch.bfloat16 or not x.is_cpu or _fast_bf16():
        return F.linear(x, weight, bias)
    if x.numel() < FLOAT32_ROWS * x.shape[-1]:
        if (bias is not None or weight.dim() != 2 or weight.stride(0) != 1 or not weight.t().is_contiguous()
                or not x.numel()):  # a bias: F.linear's own rounding of the sum, which mv + bias does not give
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        y = torch.stack([torch.mv(weight, row) for row in rows]) if len(rows) > 1 else torch.mv(weight, rows[0])[None]
        return y.reshape(*x.shape[:-1], weight.shape[0])
    xf = x.float()
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for i in range(0, weight.shape[0], CHUNK_ROWS):
        b = None if bias is None else bias[i:i + CHUNK_ROWS].float()
        out[..., i:i + CHUNK_ROWS] = F.linear(xf, weight[i:i + CHUNK_ROWS].float(), b)
    return out


FLOAT32_ROWS = 16  # from here on float32 wins (measured crossover ~12 rows on the avx2 CPU, LM head)


CHUNK_ROWS = 1024  # weight rows converted at a time (2.4 MB of the LM head in float32)


@functools.lru_cache(maxsize=1)
def _fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 / AMX): then bf16 stays bf16."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Bf16Linear(nn.Linear):
    """An nn.Linear whose products go through bf16_linear: the bf16 family's dense layers and LM head,
    and the int families' bf16 LM head (embeddings "native"). Same tensors as the nn.Linear it
    replaces (a class swap, so ties hold); float32 inputs take the plain product. The export template
    holds the same class (export/template/modeling_acip.py), so an export computes the app's numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(x, self.weight, self.bias)

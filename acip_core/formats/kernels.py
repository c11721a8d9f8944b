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
    the bf16 product, where converting the weight costs more than it saves."""
    if x.dtype is not torch.bfloat16 or x.numel() < FLOAT32_ROWS * x.shape[-1] or not x.is_cpu or _fast_bf16():
        return F.linear(x, weight, bias)
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

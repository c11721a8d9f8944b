"""The two forms of a compressed linear layer.

ACIPLinear (scoring form):  y = U·diag(s ⊙ m/c)·Vh·x + b + (α/r)·B·A·dropout(x)
    m = c·1[m̂ > 0] in the forward, ∂m/∂m̂ = 1[m̂ > 0] in the backward (straight-through estimator).
    In eval mode computed as W − U·diag(s ⊙ (1 − m/c))·Vh, the same in exact arithmetic, but in floating
    point it subtracts only what is pruned: at full size it is W bit for bit (fp32-rounded factors of a
    30-layer model otherwise shift the logits by ~1e-4). In training mode (scoring) the plain factored
    form, which is cheaper.
LowRankLinear (materialized form):  y = Ut_rᵀ·(D_r·x) + b, two skinny matmuls over views of shared factors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from acip_core.formats.kernels import bf16_linear


def ste_mask(mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward value scale·1[mask > 0]; gradient 1[mask > 0] (zero for pruned entries, not ×scale)."""
    alive = F.relu(mask)
    return (mask > 0).to(mask.dtype) * scale + alive - alive.detach()


class ACIPLinear(nn.Module):
    """A linear layer reparametrized as W = U·diag(s)·Vh with a trainable mask per singular value.

    Masks and LoRA are fp32 parameters on purpose: the reference keeps masks in bf16, where steps
    below ~6e-5 round away near c = 0.02 and masks only move once λ has grown (acip-method.md P1).
    fp32 masks make the pruning order follow the loss, not the rounding grid.
    """

    def __init__(self, weight, U, s, Vh, bias=None, mask_scale=0.02, lora_rank=32, lora_alpha=16.0,
                 lora_dropout=0.05):
        super().__init__()
        self.out_features, self.in_features = U.shape[0], Vh.shape[1]
        self.mask_scale = mask_scale
        self.register_buffer("weight", weight.detach())  # [out, in], shared with the original
        self.register_buffer("U", U.contiguous())  # [out, k]
        self.register_buffer("s", s.float().contiguous())  # [k]
        self.register_buffer("Vh", Vh.contiguous())  # [k, in]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # [out]
        self.mask = nn.Parameter(torch.full_like(self.s, mask_scale))  # [k] fp32, init c
        self.lora_rank = lora_rank
        self.lora_scaling = lora_alpha / lora_rank if lora_rank else 0.0
        self.lora_A = nn.Parameter(torch.empty(lora_rank, self.in_features))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora_rank))  # [out, r], zero: no-op
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(lora_dropout)
        self.qU = self.qVh = None  # a quantized base's factors (quantize_base_), else None

    def quantize_base_(self, format) -> None:
        """Scoring on a quantized base (`score --base-format`, the paper's §3.4 "quantize first"):
        the frozen factors become QWeights of `format` (a formats.Format) and the dense weight and the
        float factors are dropped, so the run holds low-bit frozen tensors only. Every forward then
        runs the factored form through the low-bit kernels (activations in format.compute_dtype);
        masks, singular values and LoRA stay float32. The score map and adapters learnt this way
        apply to the full-precision factors afterwards (the transfer)."""
        self.qU, self.qVh = format.pack(self.U), format.pack(self.Vh)
        self.weight = self.U = self.Vh = None

    @property
    def rank(self) -> int:
        """Number of kept singular values (mask entries > 0)."""
        return int((self.mask > 0).sum())

    def pruned_scale(self) -> torch.Tensor:
        """s ⊙ (1 − m/c): s where pruned, 0 where kept (exactly 0 at full size)."""
        return self.s - self.s * ste_mask(self.mask, self.mask_scale) / self.mask_scale  # [k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        n_in, n_out = self.in_features, self.out_features
        if self.qU is not None:  # a quantized base: the factored form, in training and evaluation
            dt = self.qU.scales.dtype
            scale = self.s * ste_mask(self.mask, self.mask_scale) / self.mask_scale  # [k]
            h = (self.qVh.matmul(x.to(dt)).float() * scale).to(dt)
            y = self.qU.matmul(h).to(x.dtype)
            y = y if self.bias is None else y + self.bias
        elif self.training:
            # Scoring: the plain factored form, whose forward + backward cost tokens·k·(in+out) each,
            # less than any form that touches W (its rounding is irrelevant to the gradients).
            scale = self.s * ste_mask(self.mask, self.mask_scale) / self.mask_scale  # [k]
            y = F.linear(F.linear(x, self.Vh) * scale, self.U, self.bias)  # [..., k] -> [..., out]
        elif tokens * (n_in + n_out) < n_out * n_in:
            # Evaluation, short inputs: W·x minus the pruned directions (exactly W·x at full size)
            y = F.linear(x, self.weight, self.bias) - F.linear(F.linear(x, self.Vh) * self.pruned_scale(), self.U)
        else:  # evaluation, long inputs: form W_eff once (k·out·in), then one dense product
            y = F.linear(x, self.weight - (self.U * self.pruned_scale().to(self.U.dtype)) @ self.Vh, self.bias)
        if self.lora_rank:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.lora_scaling
        return y

    def dense_weight(self) -> torch.Tensor:
        """The effective weight (tests and exports only; the forward never needs it)."""
        with torch.no_grad():
            if self.qU is not None:  # a quantized base: the kept directions of the dequantized factors
                w = (self.qU.dequantize() * (self.s - self.pruned_scale())) @ self.qVh.dequantize()
            else:
                w = self.weight.float() - (self.U.float() * self.pruned_scale()) @ self.Vh.float()
            return w + self.lora_scaling * self.lora_B @ self.lora_A if self.lora_rank else w

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, k={self.s.numel()}, "
                f"lora_rank={self.lora_rank}")


class LowRankLinear(nn.Module):
    """y = up·(down·x) + b with down [r, in] and up_t [r, out]; both may be views of shared factors."""

    def __init__(self, down: torch.Tensor, up_t: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = down.shape[1], up_t.shape[1]
        # Plain attributes, not Parameters: views of shared, frozen factors must never be trained
        # or re-registered; state_dict() comes from export, not from here.
        self.down, self.up_t, self.bias = down, up_t, bias

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(bf16_linear(x, self.down), self.up_t.t(), self.bias)  # [..., r] -> [..., out]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"



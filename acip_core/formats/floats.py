"""float32 and bfloat16: plain tensors of that dtype, multiplied by F.linear (bfloat16 through
formats.kernels.bf16_linear where the model's layers are swapped to Bf16Linear)."""

from __future__ import annotations

import torch

from acip_core.formats.family import Family


class FloatFamily(Family):
    quantized = False

    def __init__(self, name: str, dtype: torch.dtype, dash: str, marker: str):
        self.name, self.dtype, self.dash, self.marker = name, dtype, dash, marker

    def compute_dtype(self, format) -> torch.dtype:
        return self.dtype

    def weight_bytes(self, format, out_features: int, in_features: int) -> int:
        return out_features * in_features * self.dtype.itemsize

    def pack(self, format, weight: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
        return weight.detach().to(self.dtype).contiguous()

    def tensor_layout(self, format) -> str:
        return ("`<layer>.down.weight` [rank, in] and `<layer>.up_t` [rank, out] (y = (x·downᵀ)·up_t, "
                "+ `<layer>.bias`).")


FLOAT32 = FloatFamily("float32", torch.float32, dash="solid", marker="circle")
BFLOAT16 = FloatFamily("bfloat16", torch.bfloat16, dash="dash", marker="square")
FAMILIES = (FLOAT32, BFLOAT16)

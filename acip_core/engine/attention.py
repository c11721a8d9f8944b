"""Attention for one new token of a grouped-query model in bf16 on the CPU: transformers' own SDPA
path, but with the query heads folded onto their key/value heads.

With no mask (batch-1 decoding) transformers' SDPA passes `enable_gqa=True`, which on the CPU in bf16
takes a slow path: 61 µs a call with 64 cached tokens and 212 µs with 300 (SmolLM2's 9 query and 3
key/value heads, 2 threads, AVX2), ×30 layers a token. Folding the query heads of each group into the
query-length axis (transformers' `pack_gqa`, the form it uses when a mask is present) gives the same
attention with the flash kernel: 24 and 49 µs. The kernel blocks the work differently, so outputs can
differ in the last bf16 bit, with the same error against a float64 reference (tested; greedy tokens
equal). float32 keeps transformers' path, which is the faster one there (14 against 27 µs). Measured in
benchmarks/RESULTS.md, "The formats' decode speed on an AVX2 CPU".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "acip_sdpa"


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


AttentionInterface.register(NAME, decode_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA gets (None where it may skip one)


def use_decode_attention(model) -> None:
    """Switches a transformers model that runs SDPA to `decode_sdpa` (others are left as they are: eager,
    flash attention, a model without transformers' attention interface)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    if getattr(model, "_can_set_attn_implementation", lambda: False)():
        model.set_attn_implementation(NAME)

"""The decode attention (engine/attention.py): grouped query heads folded onto their key/value heads for
one bf16 CPU query, transformers' SDPA for everything else; the export template holds the same one."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from acip_core.engine import attention
from acip_core.export.template import modeling_acip
from helpers import random_any_size, random_ids


@pytest.mark.parametrize("cached", [1, 7, 65, 300])
def test_folded_heads_give_sdpa_attention_up_to_bf16_rounding(cached):
    g = torch.Generator().manual_seed(cached)
    q, k, v = (torch.randn(2, h, n, 64, generator=g).bfloat16() for h, n in ((9, 1), (3, cached), (3, cached)))
    module = type("Attn", (), {"num_key_value_groups": 3})()
    out, _ = attention.decode_sdpa(module, q, k, v, None, scaling=0.125)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, scale=0.125)
    plain = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.125)
    assert out.shape == (2, 1, 9, 64)  # transformers' layout: [batch, query, heads, dim]
    out = out.transpose(1, 2).double()
    # as close to the exact attention as transformers' own bf16 path is (the same flash kernel)
    assert (out - ref).abs().max() <= 1.01 * (plain.double() - ref).abs().max() + 1e-3
    assert (out - plain.double()).abs().max() <= 2 ** -7 * plain.abs().max()


def test_float32_is_transformers_own_path():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 64, generator=g) for h, n in ((9, 1), (3, 40), (3, 40)))
    module = type("Attn", (), {"num_key_value_groups": 3, "is_causal": True})()
    ours, _ = attention.decode_sdpa(module, q, k, v, None, scaling=0.125)
    plain, _ = attention.sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
    assert torch.equal(ours, plain)


def test_sizes_decode_with_it_and_the_same_tokens_as_plain_sdpa(tiny_llama):
    any_size = random_any_size(tiny_llama)[0]
    assert any_size.base.config._attn_implementation == attention.NAME
    ids = random_ids(len(any_size.tokenizer))[:1, :8]
    for key in ("float32", "bfloat16", "int8", "int4-g32"):
        model = any_size.materialize(any_size.size_for_ratio(0.6, key), key)
        kw = dict(input_ids=ids, do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
        with torch.no_grad():
            ours = model.generate(**kw)
            model.config._attn_implementation = "sdpa"
            try:
                plain = model.generate(**kw)
            finally:
                model.config._attn_implementation = attention.NAME
        assert torch.equal(ours, plain), key


def test_a_mask_takes_transformers_own_path(tiny_llama):
    any_size = random_any_size(tiny_llama)[0]
    model = any_size.materialize(any_size.size_for_ratio(0.6, "bfloat16"), "bfloat16")
    calls, original = [], attention.sdpa_attention_forward
    spy = lambda *a, **kw: calls.append(1) or original(*a, **kw)  # noqa: E731
    ids = random_ids(len(any_size.tokenizer))[:, :6]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a padded row: a mask every decode step
    attention.sdpa_attention_forward = spy
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3, pad_token_id=0)
            n_masked = len(calls)
            calls.clear()
            model.generate(input_ids=ids[:1], do_sample=False, max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    finally:
        attention.sdpa_attention_forward = original
    layers = model.config.num_hidden_layers
    assert n_masked == 3 * layers  # prefill + 2 decode steps, every one masked: transformers' path
    assert len(calls) == layers  # one query, no mask: only the prefill goes through it


def test_the_export_template_holds_the_same_attention():
    strip = lambda f: inspect.getsource(f).split('"""')[-1]  # noqa: E731  (the body, past the docstring)
    assert strip(modeling_acip.decode_sdpa) == strip(attention.decode_sdpa)

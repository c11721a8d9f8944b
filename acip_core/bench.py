"""Speed of a materialized size against the original, measured in one process, alternating."""

from __future__ import annotations

import statistics
import time

import torch

from .materialize import AnySizeModel


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, new_tokens: int, **options) -> float:
    """Seconds for a greedy generation of exactly `new_tokens` (options: more generate() arguments)."""
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **options)
    return time.perf_counter() - start


@torch.no_grad()
def _timed_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    return time.perf_counter() - start


def speed(model, ids: torch.Tensor, new_tokens: int) -> dict:
    prefill = _timed_prefill(model, ids)
    total = timed_generate(model, ids, new_tokens + 1)  # the first new token comes from the prefill
    decode = max(total - prefill, 1e-9)
    return dict(prefill_tok_s=ids.numel() / prefill, decode_tok_s=new_tokens / decode)


def compare_speed(any_size: AnySizeModel, size_ratio: float, dtype: str = "float32", prompt_tokens: int = 256,
                  new_tokens: int = 128, rounds: int = 3) -> dict:
    """Decode and prefill tokens/s of the original and of `size_ratio` (batch 1, KV cache), medians of
    `rounds` alternating measurements after one warm-up each, and their ratios."""
    size = any_size.size_for_ratio(size_ratio)
    models = {"original": any_size.materialize(any_size.full_size(), dtype),
              "compressed": any_size.materialize(size, dtype)}
    vocab = len(any_size.tokenizer)
    ids = torch.randint(100, vocab - 1, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    for m in models.values():  # warm-up
        speed(m, ids[:, :32], 4)
    runs = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            runs[name].append(speed(m, ids, new_tokens))
    out = dict(size_ratio=round(size.size_ratio, 5), dtype=dtype, params_original=any_size.full_size().params,
               params_compressed=size.params, threads=torch.get_num_threads(), prompt_tokens=prompt_tokens,
               new_tokens=new_tokens, rounds=rounds)
    for name in models:
        for key in ("prefill_tok_s", "decode_tok_s"):
            out[f"{key}_{name}"] = statistics.median(r[key] for r in runs[name])
    out["decode_speedup"] = out["decode_tok_s_compressed"] / out["decode_tok_s_original"]
    out["prefill_speedup"] = out["prefill_tok_s_compressed"] / out["prefill_tok_s_original"]
    return out

"""Speed of a materialized size against the original, measured in one process, alternating."""

from __future__ import annotations

import statistics
import time

import torch

from acip_core.formats.registry import Format, parse_format
from acip_core.engine.materialize import AnySizeModel


def cpu_flags() -> str:
    """The SIMD flags that decide which kernels are fast (reported next to every speed figure)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


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


def compare_speed(any_size: AnySizeModel, size_ratio: float, format="float32", prompt_tokens: int = 256,
                  new_tokens: int = 128, rounds: int = 3) -> dict:
    """Decode and prefill tokens/s of the original and of `size_ratio` in format `format` (batch 1, KV cache),
    medians of `rounds` alternating measurements after one warm-up each, and their ratios. For a format
    other than float32 the float32 original is measured in the same rounds too (`*_vs_float32`)."""
    format = parse_format(format)
    size = any_size.size_for_ratio(size_ratio, format)
    models = {"original": any_size.materialize(any_size.original_size(format), format),
              "compressed": any_size.materialize(size, format)}
    if format != Format():  # the float32 reference
        models["original_float32"] = any_size.materialize(any_size.original_size(), "float32")
    vocab = len(any_size.tokenizer)
    ids = torch.randint(100, vocab - 1, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    for m in models.values():  # warm-up
        speed(m, ids[:, :32], 4)
    runs = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            runs[name].append(speed(m, ids, new_tokens))
    out = dict(size_ratio=round(size.size_ratio, 5), format=format.key, params_original=any_size.original_size().params,
               params_compressed=size.params, gb_original=any_size.original_size(format).gigabytes,
               gb_compressed=size.gigabytes, threads=torch.get_num_threads(), prompt_tokens=prompt_tokens,
               new_tokens=new_tokens, rounds=rounds, cpu_flags=cpu_flags())
    for name in models:
        for key in ("prefill_tok_s", "decode_tok_s"):
            out[f"{key}_{name}"] = statistics.median(r[key] for r in runs[name])
    out["decode_speedup"] = out["decode_tok_s_compressed"] / out["decode_tok_s_original"]
    out["prefill_speedup"] = out["prefill_tok_s_compressed"] / out["prefill_tok_s_original"]
    if "original_float32" in models:
        out["decode_speedup_vs_float32"] = out["decode_tok_s_compressed"] / out["decode_tok_s_original_float32"]
    else:
        out["decode_speedup_vs_float32"] = out["decode_speedup"]
    return out

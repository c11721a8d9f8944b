"""Does a compiled decode step (static KV cache + torch.compile) lift the decode ratio of a size?

    .venv/bin/python benchmarks/compiled_decode.py [--artifact DIR] [--size-ratio 0.5] [--new-tokens 64]

The eager decode of SmolLM2 spends 7.5-8.4 ms per token outside the matrix products (attention over the
KV cache, norms, rotary, transformers' per-step work; benchmarks/decode_profile.py), which does not shrink
with the size and so caps the decode ratio. transformers compiles the decode step itself when the cache
is static and a CompileConfig allows this device; inductor then fuses that elementwise work into C++
kernels. This script measures, in one process and alternating, eager (dynamic cache) and compiled
(static cache) decode tokens/s of the original and of a size, float32, batch 1, after a 256-token prompt,
and the one-time compile cost (paid again for every new size, since each size has other shapes).
"""

import argparse
import statistics
import time

import torch
import torch._inductor.config
from transformers import CompileConfig, StaticCache

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.evaluation.bench import timed_generate  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


CACHE_LEN = 512  # prompt (256) + the longest generation


def generate_seconds(model, ids, new_tokens: int, compiled: bool) -> float:
    if not compiled:
        return timed_generate(model, ids, new_tokens, disable_compile=True)
    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    # one cache length for every call: a new length would be a new shape, hence a recompile
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    return timed_generate(model, ids, new_tokens, past_key_values=cache, compile_config=config)


def decode_tok_s(model, ids, new_tokens: int, compiled: bool) -> float:
    # the difference of a long and a one-token generation is the decode steps alone
    long = generate_seconds(model, ids, new_tokens + 1, compiled)
    return new_tokens / max(long - generate_seconds(model, ids, 1, compiled), 1e-9)


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    parser.add_argument("--size-ratio", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--freezing", action="store_true",
                        help="inductor freezing: weights become constants, pre-packed for oneDNN")
    args = parser.parse_args()
    torch._inductor.config.freezing = args.freezing
    any_size = open_artifact(args.artifact)
    models = {"original": any_size.materialize(any_size.full_size(), "float32"),
              f"size {args.size_ratio}": any_size.materialize(any_size.size_for_ratio(args.size_ratio), "float32")}
    ids = torch.randint(100, len(any_size.tokenizer) - 1, (1, 256), generator=torch.Generator().manual_seed(0))
    for name, model in models.items():  # warm-up; the compiled one pays its compile here
        generate_seconds(model, ids, 4, False)
        start = time.perf_counter()
        generate_seconds(model, ids, 4, True)
        generate_seconds(model, ids, 2, True)
        print(f"{name}: first compiled generation (compile included) {time.perf_counter() - start:.1f} s", flush=True)
    runs = {(name, compiled): [] for name in models for compiled in (False, True)}
    for _ in range(args.rounds):
        for (name, compiled), out in runs.items():
            out.append(decode_tok_s(models[name], ids, args.new_tokens, compiled))
    medians = {key: statistics.median(v) for key, v in runs.items()}
    original, size = list(models)
    for compiled in (False, True):
        kind = "compiled, static cache" if compiled else "eager, dynamic cache"
        o, s = medians[(original, compiled)], medians[(size, compiled)]
        print(f"{kind:>24s}: original {o:5.1f} tok/s, {size} {s:5.1f} tok/s, ratio {s / o:.2f}x")
    for name in models:
        print(f"{name}: compiled / eager decode {medians[(name, True)] / medians[(name, False)]:.2f}x")


if __name__ == "__main__":
    main()

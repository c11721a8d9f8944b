"""Where the app's chat loses decode speed against `bench` (issue 13, item 14), in one process.

    .venv/bin/python benchmarks/chat_speed.py [--artifact DIR] [--size-ratio 1.0] [--tokens 64] [--rounds 3]

Decodes the same prompt greedily in four ways, alternating, and prints the median decode tokens/s of
each (after the first token, which carries the prefill):
  bench          bench.timed_generate in the main thread (what `bench` reports)
  penalty        the same with the app's repetition penalty (1.15)
  thread         explorer.Generation (its own thread, streamer, stop criterion), no penalty,
                 polled by the main thread as the app's chat handler polls it
  app            explorer.Generation with the penalty: what one chat side runs
Run it on an idle machine; the ratios say which part costs what.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)
from acip_core.evaluation.bench import cpu_flags, timed_generate  # noqa: E402
from acip_core.serving.chat import Generation  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402

PROMPT = "Explain what a package manager does."


def main_thread(model, ids, tokens: int, penalty: float) -> float:
    prefill_and_one = timed_generate(model, ids, 1)
    total = timed_generate(model, ids, tokens, repetition_penalty=penalty)
    return (tokens - 1) / (total - prefill_and_one)


def in_thread(model, tokenizer, ids, tokens: int, penalty: float) -> float:
    gen = Generation(model, tokenizer, ids, tokens, penalty)
    while not gen.done:
        gen.poll(0.05)
        time.sleep(0.2)  # the chat handler sends at most 5 page updates a second
    return gen.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    parser.add_argument("--size-ratio", type=float, default=1.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    any_size = open_artifact(args.artifact)
    model = any_size.materialize(any_size.size_for_ratio(args.size_ratio))
    tok = any_size.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ways = {"bench": lambda: main_thread(model, ids, args.tokens, 1.0),
            "penalty": lambda: main_thread(model, ids, args.tokens, 1.15),
            "thread": lambda: in_thread(model, tok, ids, args.tokens, 1.0),
            "app": lambda: in_thread(model, tok, ids, args.tokens, 1.15)}
    for way in ways.values():  # warm-up
        way()
    runs = {k: [] for k in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            runs[name].append(way())
    out = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    out.update(app_vs_bench=round(out["app"] / out["bench"], 3), size_ratio=args.size_ratio,
               tokens=args.tokens, rounds=args.rounds, threads=torch.get_num_threads(), cpu_flags=cpu_flags())
    print(json.dumps(out))


if __name__ == "__main__":
    main()

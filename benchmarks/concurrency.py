"""Aggregate chat decode speed with 1, 2 and 4 concurrent chats (and a perplexity job beside them),
with the app's thread policy (explorer.ComputeGate: one forward pass at a time on the CPU) and without.

    .venv/bin/python benchmarks/concurrency.py [--artifact DIR] [--tokens 48] [--chats 1,2,4]
        [--size-ratio 0.7] [--ppl-windows 8] [--json out.json]

Every configuration runs in a fresh process (the gate is set from ACIP_COMPUTE_SLOTS when the
explorer module loads): ACIP_COMPUTE_SLOTS=1 (the app's default) and =0 (no gate: every request's
forward passes use all of torch's intra-op threads at once). In each, N threads each stream one
greedy chat reply of --tokens tokens (the app's Generation, as a chat handler runs it), with
optionally one perplexity job running beside them; reported: aggregate decode tokens/s (all
chats' tokens after their first, over the wall time from the first first-token to the last token),
each chat's own tokens/s, and the perplexity job's seconds. The policy holds when N chats together
decode at least as fast as one chat alone. Timings need a quiet machine: run it there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import common  # the repository on sys.path, the shared options

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("Explain what a package manager does.", "Write a haiku about autumn.",
           "Give three tips for writing clear emails.", "What is the capital of France?")


def one(artifact: str, chats: int, tokens: int, ratio: float, ppl_windows: int) -> dict:
    """One configuration, in this process: N concurrent chats (+ a perplexity job)."""
    import torch

    from acip_core.serving.explorer import Explorer
    from acip_core.serving.gate import GATE

    ex = Explorer.open(artifact)
    ex.model(ratio)  # materialized before the clock starts
    list(ex.stream_chat(ratio, [], "warm up", 4))
    results, ppl = [None] * chats, {}

    def chat(i):
        last = None
        for last in ex.stream_chat(ratio, [], PROMPTS[i % len(PROMPTS)], tokens, 1.0):
            pass
        results[i] = dict(last, finished=time.perf_counter())

    def perplexity():
        start = time.perf_counter()
        ex.measure_perplexity(ratio, "corpus:heldout", ppl_windows, 256, batch_size=2)
        ppl["seconds"] = time.perf_counter() - start

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(chats)]
    if ppl_windows:
        threads.append(threading.Thread(target=perplexity))
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = [start + r["first_token_s"] for r in results]
    decoded = sum(r["tokens"] - 1 for r in results)
    wall = max(r["finished"] for r in results) - min(firsts)
    return dict(chats=chats, slots=GATE.slots, torch_threads=torch.get_num_threads(), tokens=tokens,
                ppl_windows=ppl_windows, aggregate_tok_s=round(decoded / wall, 2),
                per_chat_tok_s=[round(r["tokens_per_s"] or 0, 2) for r in results],
                ppl_seconds=round(ppl["seconds"], 2) if ppl else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_artifact(parser)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--chats", default="1,2,4")
    parser.add_argument("--size-ratio", type=float, default=0.7)
    parser.add_argument("--ppl-windows", type=int, default=8, help="a perplexity job beside the chats (0: none)")
    common.add_json(parser)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.artifact, int(args.chats), args.tokens, args.size_ratio, args.ppl_windows)))
        return 0
    rows = []
    for slots in ("1", "0"):
        for n in (int(c) for c in args.chats.split(",")):
            for ppl in ((0, args.ppl_windows) if args.ppl_windows else (0,)):
                env = dict(os.environ, ACIP_COMPUTE_SLOTS=slots)
                out = subprocess.run([sys.executable, __file__, "--one", "--artifact", args.artifact, "--chats", str(n),
                                      "--tokens", str(args.tokens), "--size-ratio", str(args.size_ratio),
                                      "--ppl-windows", str(ppl)], env=env, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"slots={row['slots']} chats={n} ppl_windows={ppl}: aggregate {row['aggregate_tok_s']} tok/s, "
                      f"per chat {row['per_chat_tok_s']}, perplexity {row['ppl_seconds']} s", flush=True)
    if args.json:
        common.write_result("concurrency", dict(rows=rows, cpu=_cpu(), date=time.strftime("%Y-%m-%d")), args.json or None)
    return 0


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


if __name__ == "__main__":
    sys.exit(main())

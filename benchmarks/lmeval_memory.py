"""Memory of one lm-eval measurement by batch size: why a public Space bounds lm-eval's batch.

    python benchmarks/lmeval_memory.py [--batches 4,16,64,128] [--limit 100] [--task acip_last_word] [--json]

lm-eval's HFLM scores `batch` requests (an item's answer options) per forward and holds their logits
and log-softmax, batch × length × vocabulary float32 each (SmolLM2: 49,152 entries a token). Each batch
size runs in its own process (the peak resident memory, VmHWM, is per process): the shipped artifact's
original in float32, the task's first `limit` items (4 options each). Reported: the RSS once loaded
(freed heap returned), the peak RSS during lm-eval (the high-water mark reset after loading), their
difference, and the wall time of the evaluation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common


def _vmhwm_mib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(artifact: str, task: str, limit: int, batch: int) -> dict:
    from acip_core.artifacts.open import open_folder
    from acip_core.evaluation.lmeval import run_lm_eval

    from acip_core.training.train import release_memory, rss_mib

    any_size = open_folder(artifact).any_size
    model = any_size.materialize(any_size.original_size())
    release_memory()  # what loading freed goes back to the OS, then the high-water mark starts anew
    loaded = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now (Linux)
    start = time.perf_counter()
    result = run_lm_eval(model, any_size.tokenizer, [task], limit, batch)
    seconds = time.perf_counter() - start
    peak = _vmhwm_mib()
    return dict(batch=batch, loaded_mib=round(loaded), peak_mib=round(peak), lm_eval_mib=round(peak - loaded),
                seconds=round(seconds, 1), acc=result[task]["acc"], samples=result[task]["samples"])


def main() -> None:
    p = common.add_artifact(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--batches", default="4,16,64,128")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--task", default="acip_last_word")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    common.add_json(p)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.artifact, args.task, args.limit, args.child)))
        return
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        out = subprocess.run([sys.executable, __file__, "--artifact", args.artifact, "--limit", str(args.limit),
                              "--task", args.task, "--child", str(batch)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"batch {batch:4d}: peak {r['peak_mib']:6d} MiB (+{r['lm_eval_mib']} MiB over the loaded model), "
              f"{r['seconds']:.1f} s, acc {r['acc']:.3f} on {r['samples']} items", flush=True)
    if args.json is not None:
        common.write_result("lmeval_memory", dict(task=args.task, limit=args.limit, rows=rows), args.json or None)


if __name__ == "__main__":
    main()

"""The memory plan (acip_core/training/plan.py) against measured peaks (benchmarks/RESULTS.md, "Memory plan").

  .venv/bin/python benchmarks/plan_check.py [--run-tiny] [--run-smollm2 STEPS [--objective lm|kd|lm+kd]]

Prints, for each case, the plan's figure, the measured one and the error (plan / measured − 1):
- recorded peaks of RESULTS.md (base_memory.sh, fsdp_memory.sh, the H200 runs), planned for exactly
  their settings;
- --run-tiny: a tiny random Llama (hidden 128, MLP 256, 2 blocks) scored for 2 steps at 4 × 64 in a
  subprocess, with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS, so the RSS is live memory);
- --run-smollm2 N: the shipped recipe (batch 4 × 256, float32 on CPUs without bf16) for N steps, the
  same allocator setting (minutes, about 5 GB of RAM).
A run's figure is the largest `steps_peak_mib` (peak RSS within a step, train.memory_fields).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
import common  # noqa: E402,F401  (the repository on sys.path, the shared options)
MiB = 2**20


def _steps_peak(model: str, data: str, batch: int, seq: int, steps: int, extra=()) -> int:
    out = Path(tempfile.mkdtemp()) / "run"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "acip_core", "score", "--model", model, "--data", data,
                          "--out", str(out), "--steps", str(steps), "--post-tune-steps", "0", "--batch-size",
                          str(batch), "--seq-len", str(seq), "--eval-windows", "0", "--stop-ratio", "0.05",
                          "--force", "--json", *extra], env=env, capture_output=True, text=True, cwd=REPO)
    if run.returncode:
        raise SystemExit(run.stderr[-2000:])
    return json.loads(run.stdout)["result"]["steps_peak_mib"]


def _row(case: str, planned_mib: float, measured_mib: float, source: str) -> None:
    print(f"| {case} | {planned_mib:,.0f} | {measured_mib:,.0f} | {planned_mib / measured_mib - 1:+.1%} | {source} |")


def _tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import _tiny, _tokenizer

    if not (folder / "m" / "config.json").is_file():
        _tiny("llama", folder / "m", _tokenizer(folder / "tok"), hidden_size=128, intermediate_size=256,
              tie_word_embeddings=True)
    return str(folder / "m")


def main() -> None:
    from acip_core.training.plan import plan_scoring

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-tiny", action="store_true")
    ap.add_argument("--run-smollm2", type=int, default=0, metavar="STEPS")
    ap.add_argument("--objective", default="lm", choices=["lm", "kd", "lm+kd"],
                    help="the --run-smollm2 run's objective (kd / lm+kd: the teacher's logits, planned too)")
    args = ap.parse_args()

    def plan(batch, seq, **kw):
        return plan_scoring("smollm2-135m-instruct", batch, seq, probe=False, **kw)

    def mib(p, where="ram", phases=("steps",)):
        return p.needed(where, phases) / MiB

    print("| case | plan MiB | measured MiB | error | measured by |")
    print("|---|---|---|---|---|")
    fp32, int4 = plan(4, 256, precision="fp32"), plan(4, 256, precision="fp32", base_format="int4")
    _row("SmolLM2 4 × 256, float32 base, peak within a step", mib(fp32), 4858,
         "base_memory.sh, MALLOC_MMAP_THRESHOLD_=65536 (RESULTS \"Scoring variants\")")
    _row("SmolLM2 4 × 256, int4 base, peak within a step", mib(int4), 3892, "the same")
    _row("SmolLM2 4 × 256, float32 base, glibc's default heap", mib(fp32), 6861, "base_memory.sh, glibc defaults")
    _row("SmolLM2 4 × 256, int4 base, glibc's default heap", mib(int4), 7014, "the same")
    for base, measured in (("float32", 3052), ("int8", 2763), ("int4", 2833)):
        gpu = plan(4, 256, device="cuda", base_format=base)
        context = next(t.bytes for t in gpu.terms if t.name == "CUDA context") / MiB
        _row(f"SmolLM2 4 × 256 on a GPU (bf16), {base} base, GPU", mib(gpu, "gpu") - context, measured,
             "H200, torch.cuda.max_memory_allocated (no CUDA context) (RESULTS \"On a GPU\")")
    # fsdp_memory.sh: 2 × 128 global, 3 steps, bf16 autocast (an AVX-512-BF16 CPU), glibc defaults;
    # its figure is the process's peak RSS (setup included, the basis read from the cache)
    whole = ("setup", "steps")
    _row("SmolLM2 2 × 128, 1 process, process peak", mib(plan(2, 128, precision="bf16"), phases=whole), 3165,
         "fsdp_memory.sh (RESULTS \"Distributed scoring\")")
    rep = plan(1, 128, precision="bf16")  # replicated: each process is a 1-process run with its rows
    _row("SmolLM2 2 × 128, 2 processes replicated, rank 0", mib(rep, phases=whole), 3204, "the same")
    _row("SmolLM2 2 × 128, 2 processes replicated, rank 1", mib(rep, phases=whole), 2843, "the same")
    sharded = plan(2, 128, precision="bf16", fsdp=2)
    _row("SmolLM2 2 × 128, --fsdp 2, rank 0", mib(sharded, phases=whole), 2743, "the same")
    _row("SmolLM2 2 × 128, --fsdp 2, rank 1 (no weights before sharding)", mib(sharded), 1948, "the same")
    serve = {t.name: t.bytes / MiB for t in fp32.terms}
    _row("the app with SmolLM2's artifact loaded (float32 family)", mib(fp32, phases=("serve",)), 1624,
         "load_test.py --public, RSS loaded (RESULTS \"Public deployment\")")
    _row("+ the int8 family", serve["serve: + int8 family"], 492, "RSS growth once built (\"Precision as a second axis\")")
    _row("+ the int4-g32 family", serve["serve: + int4-g32 family"], 456, "the same")
    if args.run_tiny:
        model = _tiny_model(Path(tempfile.mkdtemp()))
        planned = plan_scoring(model, 4, 64, precision="fp32", probe=False)
        _row("tiny Llama 4 × 64 (hidden 128), 2 steps", mib(planned), _steps_peak(model, "corpus:train", 4, 64, 2,
                                                                               ("--precision", "fp32")),
             "this script, now")
    if args.run_smollm2:
        measured = _steps_peak("smollm2-135m-instruct", "corpus:broad", 4, 256, args.run_smollm2,
                               ("--precision", "fp32", "--objective", args.objective))
        planned = plan(4, 256, precision="fp32", objective=args.objective)
        _row(f"SmolLM2 4 × 256, float32 base, {args.objective}, {args.run_smollm2} steps", mib(planned), measured,
             "this script, now")


if __name__ == "__main__":
    main()

"""What one Score-tab poll tick costs with many run folders: the tick lists runs, the runs table and the
artifacts (three readers of the runs folder).

    python benchmarks/runs_poll.py [--runs 2000] [--old path/to/old/jobs.py]

Makes `--runs` stopped run folders (run.json + a 200-line log.jsonl each) in a temp dir, then times
three list() calls (one tick) with acip_core.serving.jobs, and with an older jobs.py when --old is given
(loaded as acip_core.old_jobs, so its relative imports resolve).
"""

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)


def make_runs(root: Path, n: int) -> None:
    log = "\n".join(json.dumps(dict(step=s, phase="acip", loss=3.0, reg_weight=1e-3, size_ratio=1.0 - s / 400,
                                    seconds=float(s))) for s in range(200)) + "\n"
    for i in range(n):
        folder = root / f"run-{i:05d}"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(dict(name=folder.name, args=["x"], model="m", created=i,
                                                         config=dict(steps=400, stop_ratio=0.4))))
        (folder / "log.jsonl").write_text(log)


def tick_seconds(jobs_cls, root: Path) -> float:
    jobs = jobs_cls(root)
    start = time.perf_counter()
    jobs.list()
    jobs.list()
    jobs.artifacts()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--old", help="an older jobs.py to compare with")
    args = parser.parse_args()
    from acip_core.serving.jobs import ScoringJobs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        make_runs(root, args.runs)
        print(f"{args.runs} runs, one tick (3 readers): now {tick_seconds(ScoringJobs, root):.2f} s")
        if args.old:
            spec = importlib.util.spec_from_file_location("acip_core.old_jobs", args.old)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            print(f"{args.runs} runs, one tick (3 readers): before {tick_seconds(module.ScoringJobs, root):.2f} s")


if __name__ == "__main__":
    main()

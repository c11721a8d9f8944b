"""What every benchmark shares: the repository on `sys.path`, the shipped artifact as the default
`--artifact`, timing rounds, the machine description and the results file (benchmarks/results/NAME.json).

A script imports this module before `acip_core` (`import common` when run as `python benchmarks/x.py`,
whose folder is then on `sys.path`; `python -m benchmarks x` puts the folder there too)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
ARTIFACT = str(ROOT / "precomputed" / "smollm2-135m-instruct")  # the shipped artifact

if str(ROOT) not in sys.path:  # acip_core imports from the checkout, as `make` and the tests do
    sys.path.insert(0, str(ROOT))


def add_artifact(parser, **options):
    """The `--artifact` option every benchmark of the shipped model takes (default: the shipped one)."""
    parser.add_argument("--artifact", default=ARTIFACT, **options)
    return parser


def seconds(fn, *args, **kwargs) -> float:
    """Wall seconds of one call (perf_counter)."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def timing_rounds(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Seconds of each callable in `fns`, alternating within each of `rounds` rounds after `warmup`
    untimed calls each (alternating keeps a drift of the machine from favouring one of them);
    returns {name: [seconds per round]}. `median_rounds` reduces it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return times


def median_rounds(times: dict) -> dict:
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_model() -> str:
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine() -> dict:
    """The machine a figure was measured on (reported with every result): CPU model, the SIMD flags
    that decide which kernels are fast, cores, torch and its threads."""
    import torch

    from acip_core.evaluation.bench import cpu_flags

    return dict(cpu=cpu_model(), cpu_flags=cpu_flags(), cores=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), python=platform.python_version())


def result_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def write_result(name: str, figures, path=None) -> Path:
    """Write `figures` with the machine, the date and the command line to benchmarks/results/NAME.json
    (or `path`); the tables of RESULTS.md are generated from these files (`python -m benchmarks tables`)."""
    path = Path(path) if path else result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(name=name, date=datetime.date.today().isoformat(),
                  command=shlex.join([Path(sys.executable).name, *sys.argv]), machine=machine(),
                  figures=figures)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_result(name: str) -> dict:
    """The record of benchmarks/results/NAME.json (name, date, command, machine, figures); a `.jsonl`
    result (one object per line, as lm-eval sweeps append them) comes back with its lines as figures."""
    path = result_path(name)
    if not path.exists() and path.with_suffix(".jsonl").exists():
        lines = path.with_suffix(".jsonl").read_text().splitlines()
        return dict(name=name, figures=[json.loads(line) for line in lines if line.strip()])
    return json.loads(path.read_text())


def add_json(parser, **options):
    """`--json [PATH]`: write the run's figures as a result (`write_result`): to benchmarks/results/NAME.json
    when no PATH is given."""
    parser.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                        help="write figures, machine, date and command to benchmarks/results/NAME.json (or PATH)",
                        **options)
    return parser

"""Background runs: `python -m acip_core score|finetune ... --out runs/<name>` as child processes.

All state lives in the process and its folder (run.json: how it was launched; log.jsonl: one line
per step; checkpoint.json: resumable; acip.json: finished), so a reloaded page, or a restarted
app, finds its runs again. Cancel = terminate (the run resumes from its last checkpoint);
resume = relaunch the same command with --resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

from acip_core.artifacts.tuned import is_tuned
from acip_core.formats.registry import parse_format
from acip_core.serving import public
from acip_core.sources.data import DEFAULT_DATA
from acip_core.sources.models import ContextLengthError, ModelSourceError
from acip_core.training.finetune import FinetuneConfig
from acip_core.training.plan import check_fits, plan_for_config
from acip_core.training.score import ScoreConfig
from acip_core.training.train import LOG_FILE, log_rows

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RUN_FILE, OUTPUT_FILE = "run.json", "output.log"  # a run's log.jsonl: train.LOG_FILE
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TARGETS = re.compile(r"^[A-Za-z0-9_.]{1,64}(,[A-Za-z0-9_.]{1,64}){0,63}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _is_our_run(pid: int, folder: Path) -> bool:
    """Whether pid is a scoring process writing to folder (so a recycled pid is never signalled)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc (macOS): trust the recorded pid
    return b"acip_core" in cmd and str(folder).encode() in cmd


def _last_log_row(folder: Path) -> dict:
    """The last complete line of log.jsonl, reading only the file's end (a run may log 10,000 steps)."""
    path = Path(folder) / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 8192, 0))
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):  # a line being written
            continue
        if isinstance(row, dict):
            return row
    return {}


def read_log(folder: Path) -> pd.DataFrame:
    """log.jsonl as a DataFrame (step, phase, loss, nll, reg_weight, size_ratio, seconds)."""
    return pd.DataFrame(log_rows(Path(folder) / LOG_FILE))  # a line being written is skipped


class ScoringJobs:
    """Starts, lists, cancels and resumes scoring runs under `root` (one folder per run)."""
    LIST_TTL_S = 1.0  # list() answers from one scan for this long: every poll of every session shares it

    def __init__(self, root: str | Path = "runs", max_running: int | None = None, python: str = sys.executable):
        self.root, self.python = Path(root), python
        self.max_running = max_running if max_running is not None else public.limits().max_running
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()
        self._timed_out: set[str] = set()
        self._lock = threading.RLock()  # start/resume: the slot check and the launch are one step
        self._snapshot: tuple[float, list[dict]] | None = None
        self.scans = 0  # how many times the runs folder was scanned (tests: once per poll tick)

    def folder(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return self.root / name

    # -- launching ----------------------------------------------------------------------------
    def start(self, name: str, model: str, data: str = DEFAULT_DATA, steps: int = 200,
              basis: str = "whitened", stop_ratio: float = 0.4, owner: str | None = None,
              targets: str | None = None, **options) -> dict:
        """Launches a new run; `options` are further ScoreConfig fields (e.g. batch_size=2); `targets`
        the layers to compress as the CLI's --targets (None or empty: discovered).

        Everything is checked before anything is written: a refused start leaves no folder; a run whose
        memory plan (plan.py) does not fit what is free now is refused with both numbers. `owner`
        (public.owner()) is recorded; only they (or the admin) may cancel, resume or delete the run.
        """
        lim = public.limits()
        folder = self.folder(name)
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"a run named {name!r} already exists; resume it or pick another name")
        model = public.check_model(model)
        data = public.check_data(data)
        if basis not in ("whitened", "svd"):
            raise ValueError(f"basis must be whitened or svd, got {basis!r}")
        cfg = ScoreConfig(steps=int(steps), stop_ratio=float(stop_ratio), **options)  # validates
        for key, most in (("steps", lim.max_steps), ("post_tune_steps", lim.max_steps),
                          ("batch_size", lim.max_batch_size), ("seq_len", lim.max_seq_len)):
            if getattr(cfg, key) > most:
                raise ValueError(f"{key} {getattr(cfg, key)} is above the limit of {most} here")
        targets = ",".join(t.strip() for t in (targets or "").split(",") if t.strip())
        if targets and not _TARGETS.fullmatch(targets):
            raise ValueError(f"targets {targets[:80]!r}: comma-separated layer names (letters, digits, '_', '.')")
        # --force: the memory plan is checked here, once (_check_memory), not again by the child
        args = ["-m", "acip_core", "-v", "score", "--model", model, "--data", data,
                "--out", str(folder), "--basis", basis, "--force"] + (["--targets", targets] if targets else [])
        defaults = ScoreConfig()
        for key, value in vars(cfg).items():
            if value != getattr(defaults, key) or key in ("steps", "stop_ratio"):
                args += ["--" + key.replace("_", "-"), str(value)]
        with self._lock:
            self._check_slot()
            self._check_memory(model, cfg, basis, targets.split(",") if targets else None)
            self._bound_disk(lim.runs_bytes)
            folder.mkdir(parents=True, exist_ok=True)
            spec = dict(name=name, args=args, model=model, data=data, basis=basis, config=vars(cfg),
                        created=time.time(), owner=owner, max_seconds=lim.max_run_seconds
                        if lim.max_run_seconds != float("inf") else None)
            (folder / RUN_FILE).write_text(json.dumps(spec, indent=1))
            return self._launch(name, args)

    @staticmethod
    def _check_memory(model: str, cfg: ScoreConfig, basis: str, targets=None) -> None:
        """Refuses (plan.PlanRefused, with needed and available GiB) a run whose memory plan does not fit
        what is free now; a model whose config cannot be read, or a sequence past its context, is refused
        too (the run could only fail). A config the plan cannot build on the meta device is let through
        with a warning."""
        try:
            plan = plan_for_config(model, cfg, basis, targets=targets)
        except ContextLengthError:
            raise
        except ModelSourceError as err:
            raise ValueError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the plan is advice; an architecture it cannot build runs unplanned
            log.warning("no memory plan for %s (%s: %s); starting without one", model, type(err).__name__, err)
            return
        check_fits(plan)

    def start_finetune(self, name: str, artifact: str, size_ratio: float, objective: str = "lm+kd",
                       steps: int = 200, data: str = DEFAULT_DATA, owner: str | None = None, **options) -> dict:
        """Launches `finetune` of one size of `artifact` (a tuned size lands in the run's folder);
        `options` are further FinetuneConfig fields. The same status/cancel/resume/owner rules and
        public-mode bounds as scoring runs; a refused start leaves no folder."""
        lim = public.limits()
        folder = self.folder(name)
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"a run named {name!r} already exists; resume it or pick another name")
        if not isinstance(artifact, str) or not (Path(artifact) / "acip.json").is_file() or is_tuned(artifact):
            raise ValueError(f"{artifact!r} is not an artifact folder (a tuned size cannot be tuned again)")
        data = public.check_data(data)
        cfg = FinetuneConfig(steps=int(steps), objective=objective, **options)  # validates
        if cfg.steps > lim.max_steps:
            raise ValueError(f"steps {cfg.steps} is above the limit of {lim.max_steps} here")
        if not 0.0 < float(size_ratio) < 1.0:
            raise ValueError(f"size_ratio must be in (0, 1), got {size_ratio}")
        args = ["-m", "acip_core", "-v", "finetune", "--artifact", artifact, "--size-ratio", str(float(size_ratio)),
                "--data", data, "--out", str(folder)]
        for key, value in vars(cfg).items():
            if key == "format":  # the CLI's format flags: --format NAME [--group-size G] [--embeddings E] [--layout L]
                fmt = parse_format(value)
                args += ["--format", fmt.name, "--embeddings", fmt.embeddings, "--layout", fmt.layout]
                args += ["--group-size", str(fmt.group_size)] if fmt.name == "int4" else []
                continue
            args += ["--" + key.replace("_", "-"), str(value)]
        with self._lock:
            self._check_slot()
            self._bound_disk(lim.runs_bytes)
            folder.mkdir(parents=True, exist_ok=True)
            spec = dict(name=name, kind="finetune", args=args, model=artifact, data=data, config=vars(cfg),
                        size_ratio=float(size_ratio), created=time.time(), owner=owner,
                        max_seconds=lim.max_run_seconds if lim.max_run_seconds != float("inf") else None)
            (folder / RUN_FILE).write_text(json.dumps(spec, indent=1))
            return self._launch(name, args)

    def resume(self, name: str, who: str | None = None) -> dict:
        """Relaunches a stopped run with --resume (it continues from its last checkpoint)."""
        folder = self.folder(name)
        spec = self._owned(name, who)
        if not spec.get("args"):
            raise ValueError(f"no run named {name!r}")
        status = self.status(name)
        if status["state"] in ("running", "evaluating", "starting"):
            raise ValueError(f"run {name!r} is still running")
        if status["state"] == "finished":
            raise ValueError(f"run {name!r} has finished; its artifact is {folder}")
        with self._lock:
            self._check_slot()
            return self._launch(name, spec["args"] + ["--resume"])

    def delete(self, name: str, who: str | None = None) -> None:
        """Removes a run's folder (checkpoints, log, artifact); refused while it runs."""
        folder = self.folder(name)
        self._owned(name, who)
        if not folder.is_dir():
            raise ValueError(f"no run named {name!r}")
        if self._running(name, folder):
            raise ValueError(f"run {name!r} is running: cancel it first")
        shutil.rmtree(folder)
        self._procs.pop(name, None)
        self._snapshot = None
        log.info("deleted scoring run %s", name)

    def _owned(self, name: str, who: str | None) -> dict:
        """The run's spec, when `who` may control it (public.may_control); else ValueError."""
        spec = self._spec(self.folder(name)) or {}
        if not public.may_control(spec.get("owner"), who):
            raise ValueError(f"run {name!r} belongs to whoever started it: only they (or the Space's "
                             "owner, with the admin token) may cancel, resume or delete it")
        return spec

    def _running_names(self) -> list[str]:
        """Runs whose process is alive (a fresh look, no log reading)."""
        if not self.root.is_dir():
            return []
        return [f.name for f in self.root.iterdir()
                if f.is_dir() and _NAME.fullmatch(f.name) and self._running(f.name, f)]

    def _check_slot(self) -> None:
        running = self._running_names()
        if len(running) >= self.max_running:
            raise ValueError(f"{len(running)} run(s) already running ({', '.join(running)}); "
                             "cancel one or wait for it to finish")

    def _bound_disk(self, max_bytes: float) -> None:
        """Removes the oldest runs that are not running until the runs folder holds at most max_bytes."""
        if max_bytes == float("inf") or not self.root.is_dir():
            return
        idle = [f for f in self.root.iterdir() if f.is_dir() and _NAME.fullmatch(f.name)
                and not self._running(f.name, f)]
        for f in public.evict_oldest(self.root, max_bytes, entries=idle):
            log.info("removed the old run %s (runs folder bound)", f.name)

    def _launch(self, name: str, args: list[str]) -> dict:
        folder = self.folder(name)
        output = open(folder / OUTPUT_FILE, "a")
        output.write(f"\n$ python {' '.join(args)}\n")
        output.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([self.python] + args, stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=env, start_new_session=True)
        output.close()
        self._procs[name] = proc
        self._cancelled.discard(name)
        self._timed_out.discard(name)
        self._snapshot = None
        spec = self._spec(folder) or {}
        spec.update(pid=proc.pid, launched=time.time())
        (folder / RUN_FILE).write_text(json.dumps(spec, indent=1))
        if spec.get("max_seconds"):  # the wall-time bound (public.Limits.max_run_seconds)
            timer = threading.Timer(spec["max_seconds"], self._time_out, args=(name, proc.pid))
            timer.daemon = True
            timer.start()
        log.info("started scoring run %s (pid %d)", name, proc.pid)
        return self.status(name)

    def _time_out(self, name: str, pid: int) -> None:
        """Stops a run that ran past its wall time (it stays resumable from its last checkpoint)."""
        if self._pid(name, self.folder(name)) == pid:
            log.info("scoring run %s reached its wall-time limit; stopping it", name)
            self._timed_out.add(name)
            try:
                self.cancel(name)
            except (ValueError, OSError):
                pass
            self._cancelled.discard(name)

    def cancel(self, name: str, wait: float = 10.0, who: str | None = None) -> dict:
        """Terminates a running run (it can be resumed from its last checkpoint)."""
        folder = self.folder(name)
        self._owned(name, who)
        pid = self._pid(name, folder)
        if pid is None:
            raise ValueError(f"run {name!r} is not running")
        self._cancelled.add(name)
        self._snapshot = None
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + wait
        while time.time() < deadline and self._running(name, folder):
            time.sleep(0.1)
        if self._running(name, folder):
            os.kill(pid, signal.SIGKILL)
        return self.status(name)

    # -- reading ------------------------------------------------------------------------------
    @staticmethod
    def _spec(folder: Path) -> dict | None:
        try:
            return json.loads((folder / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _pid(self, name: str, folder: Path) -> int | None:
        proc = self._procs.get(name)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        spec = self._spec(folder) or {}
        pid = spec.get("pid")
        return pid if isinstance(pid, int) and _alive(pid) and _is_our_run(pid, folder) else None

    def _running(self, name: str, folder: Path) -> bool:
        return self._pid(name, folder) is not None

    def status(self, name: str) -> dict:
        """dict(name, state, step, phase, loss, reg_weight, size_ratio, seconds, eta_s, message)."""
        folder = self.folder(name)
        spec = self._spec(folder) or {}
        running = self._running(name, folder)
        history = read_log(folder) if running else None  # the ETA needs it; else the last line will do
        last = (history.iloc[-1].to_dict() if len(history) else {}) if running else _last_log_row(folder)
        result = "tuned.json" if spec.get("kind") == "finetune" else "acip.json"
        finished = (folder / result).is_file() and not (folder / "checkpoint.json").is_file()
        proc = self._procs.get(name)
        code = proc.returncode if proc is not None and proc.poll() is not None else None
        if finished:
            state, message = "finished", f"{'tuned size' if result == 'tuned.json' else 'artifact'} ready in {folder}"
        elif running:
            state = "starting" if not last else "evaluating" if last.get("phase") == "done" else "running"
            message = dict(starting="loading the model and building the basis",
                           evaluating=("fine-tuning done; measuring perplexities" if result == "tuned.json"
                                       else "scoring done; measuring the curve and writing the artifact"),
                           running="fine-tuning" if result == "tuned.json" else "scoring").get(state)
        elif name in self._timed_out:
            state, message = "stopped", ("stopped at its wall-time limit "
                                         f"({(spec.get('max_seconds') or 0) / 60:.0f} min); resume continues "
                                         "from the last checkpoint")
        elif name in self._cancelled:
            state, message = "cancelled", "cancelled; resume continues from the last checkpoint"
        elif code not in (None, 0) or self._error_line(folder):
            state, message = "failed", self._error_line(folder) or f"exited with code {code}"
        else:
            state, message = "stopped", "not running; resume continues from the last checkpoint"
        cfg = spec.get("config", {})
        return dict(name=name, state=state, model=spec.get("model"), owner=spec.get("owner"), step=last.get("step"),
                    phase=last.get("phase"), loss=last.get("loss"), reg_weight=last.get("reg_weight"),
                    size_ratio=last.get("size_ratio"), seconds=last.get("seconds"),
                    stop_ratio=cfg.get("stop_ratio"), eta_s=self._eta(history, cfg) if running else None,
                    message=message, folder=str(folder))

    @staticmethod
    def _eta(history: pd.DataFrame, cfg: dict) -> float | None:
        """Upper bound on the seconds left: every ACIP step up to `steps`, then post-tuning."""
        if len(history) < 2 or not cfg:
            return None
        recent = history.tail(20)
        per_step = (recent.seconds.iloc[-1] - recent.seconds.iloc[0]) / max(len(recent) - 1, 1)
        acip_done = int((history.phase == "acip").sum())
        post_done = int((history.phase == "post_tune").sum())
        last_phase = history.phase.iloc[-1]
        left = cfg.get("post_tune_steps", 0) - post_done
        if last_phase == "finetune":
            left = cfg.get("steps", 0) - int((history.phase == "finetune").sum())
        elif last_phase == "acip":
            left += cfg.get("steps", 0) - acip_done
        elif last_phase == "done":
            left = 0
        return max(left, 0) * per_step

    @staticmethod
    def _error_line(folder: Path) -> str | None:
        path = folder / OUTPUT_FILE
        if not path.is_file():
            return None
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        tail = lines[-1] if lines else ""
        return tail[:300] if tail.startswith("error:") or "Error" in tail else None

    def output_tail(self, name: str, lines: int = 20) -> str:
        path = self.folder(name) / OUTPUT_FILE
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def history(self, name: str) -> pd.DataFrame:
        return read_log(self.folder(name))

    def list(self, fresh: bool = False) -> list[dict]:
        """Every run under root, newest first: one scan of the folder answers every caller for
        LIST_TTL_S seconds (a poll tick lists runs, the run table and artifacts; many sessions poll)."""
        with self._lock:
            snap = self._snapshot
            if not fresh and snap is not None and time.monotonic() - snap[0] < self.LIST_TTL_S:
                return [dict(r) for r in snap[1]]
            rows = self._scan()
            self._snapshot = (time.monotonic(), rows)
            return [dict(r) for r in rows]

    def _scan(self) -> list[dict]:
        self.scans += 1
        if not self.root.is_dir():
            return []
        specs = {}
        for f in self.root.iterdir():
            if f.is_dir() and _NAME.fullmatch(f.name) and ((f / RUN_FILE).is_file() or (f / LOG_FILE).is_file()
                                                       or (f / "acip.json").is_file()
                                                       or (f / "tuned.json").is_file()):
                specs[f.name] = (self._spec(f) or {}).get("created") or f.stat().st_mtime
        names = sorted(specs, key=lambda n: specs[n], reverse=True)
        rows = [self.status(n) for n in names]
        for r in rows:  # a run launched before an app restart has no timer: its bound is checked here
            spec = self._spec(Path(r["folder"])) or {}
            if (r["state"] in ("starting", "running", "evaluating") and spec.get("max_seconds")
                    and time.time() > spec.get("launched", time.time()) + spec["max_seconds"]
                    and isinstance(spec.get("pid"), int)):
                threading.Thread(target=self._time_out, args=(r["name"], spec["pid"]), daemon=True).start()
        return rows

    def artifacts(self) -> list[Path]:
        """Folders of finished scoring runs (usable as artifacts)."""
        return [Path(r["folder"]) for r in self.list()
                if r["state"] == "finished" and (Path(r["folder"]) / "acip.json").is_file()]

    def tuned(self) -> list[Path]:
        """Folders of finished fine-tuning runs (tuned sizes; tuned.tuned_sizes lists them per artifact)."""
        return [Path(r["folder"]) for r in self.list()
                if r["state"] == "finished" and (Path(r["folder"]) / "tuned.json").is_file()]

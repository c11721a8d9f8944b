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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from .data import DEFAULT_DATA
from .score import ScoreConfig

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RUN_FILE, LOG_FILE, OUTPUT_FILE = "run.json", "log.jsonl", "output.log"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


def read_log(folder: Path) -> pd.DataFrame:
    """log.jsonl as a DataFrame (step, phase, loss, nll, reg_weight, size_ratio, seconds)."""
    path = Path(folder) / LOG_FILE
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return pd.DataFrame(rows)


class ScoringJobs:
    """Starts, lists, cancels and resumes scoring runs under `root` (one folder per run)."""

    def __init__(self, root: str | Path = "runs", max_running: int = 1, python: str = sys.executable):
        self.root, self.max_running, self.python = Path(root), max_running, python
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()

    def folder(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return self.root / name

    # -- launching ----------------------------------------------------------------------------
    def start(self, name: str, model: str, data: str = DEFAULT_DATA, steps: int = 200,
              basis: str = "whitened", stop_ratio: float = 0.4, **options) -> dict:
        """Launches a new run; `options` are further ScoreConfig fields (e.g. batch_size=2)."""
        folder = self.folder(name)
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"a run named {name!r} already exists; resume it or pick another name")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("give a model: the embedded default, a local directory or a hub id")
        if basis not in ("whitened", "svd"):
            raise ValueError(f"basis must be whitened or svd, got {basis!r}")
        cfg = ScoreConfig(steps=int(steps), stop_ratio=float(stop_ratio), **options)  # validates
        args = ["-m", "acip_core", "-v", "score", "--model", model.strip(), "--data", data,
                "--out", str(folder), "--basis", basis]
        defaults = ScoreConfig()
        for key, value in vars(cfg).items():
            if value != getattr(defaults, key) or key in ("steps", "stop_ratio"):
                args += ["--" + key.replace("_", "-"), str(value)]
        folder.mkdir(parents=True, exist_ok=True)
        spec = dict(name=name, args=args, model=model, data=data, basis=basis, config=vars(cfg),
                    created=time.time())
        (folder / RUN_FILE).write_text(json.dumps(spec, indent=1))
        return self._launch(name, args)

    def start_finetune(self, name: str, artifact: str, size_ratio: float, objective: str = "kd",
                       steps: int = 200, data: str = DEFAULT_DATA, **options) -> dict:
        """Launches `finetune` of one size of `artifact` (a tuned size lands in the run's folder);
        `options` are further FinetuneConfig fields. The same status/cancel/resume as scoring runs."""
        from .finetune import FinetuneConfig
        from .tuned import is_tuned

        folder = self.folder(name)
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"a run named {name!r} already exists; resume it or pick another name")
        if not isinstance(artifact, str) or not (Path(artifact) / "acip.json").is_file() or is_tuned(artifact):
            raise ValueError(f"{artifact!r} is not an artifact folder (a tuned size cannot be tuned again)")
        cfg = FinetuneConfig(steps=int(steps), objective=objective, **options)  # validates
        if not 0.0 < float(size_ratio) < 1.0:
            raise ValueError(f"size_ratio must be in (0, 1), got {size_ratio}")
        args = ["-m", "acip_core", "-v", "finetune", "--artifact", artifact, "--size-ratio", str(float(size_ratio)),
                "--data", data, "--out", str(folder)]
        for key, value in vars(cfg).items():
            args += ["--" + key.replace("_", "-"), str(value)]
        folder.mkdir(parents=True, exist_ok=True)
        spec = dict(name=name, kind="finetune", args=args, model=artifact, data=data, config=vars(cfg),
                    size_ratio=float(size_ratio), created=time.time())
        (folder / RUN_FILE).write_text(json.dumps(spec, indent=1))
        return self._launch(name, args)

    def resume(self, name: str) -> dict:
        """Relaunches a stopped run with --resume (it continues from its last checkpoint)."""
        folder = self.folder(name)
        spec = self._spec(folder)
        if spec is None:
            raise ValueError(f"no run named {name!r}")
        status = self.status(name)
        if status["state"] in ("running", "evaluating", "starting"):
            raise ValueError(f"run {name!r} is still running")
        if status["state"] == "finished":
            raise ValueError(f"run {name!r} has finished; its artifact is {folder}")
        return self._launch(name, spec["args"] + ["--resume"])

    def _launch(self, name: str, args: list[str]) -> dict:
        running = [r["name"] for r in self.list() if r["state"] in ("running", "starting", "evaluating")]
        if len(running) >= self.max_running:
            raise ValueError(f"{len(running)} run(s) already running ({', '.join(running)}); "
                             "cancel one or wait for it to finish")
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
        spec = self._spec(folder) or {}
        spec.update(pid=proc.pid, launched=time.time())
        (folder / RUN_FILE).write_text(json.dumps(spec, indent=1))
        log.info("started scoring run %s (pid %d)", name, proc.pid)
        return self.status(name)

    def cancel(self, name: str, wait: float = 10.0) -> dict:
        """Terminates a running run (it can be resumed from its last checkpoint)."""
        folder = self.folder(name)
        pid = self._pid(name, folder)
        if pid is None:
            raise ValueError(f"run {name!r} is not running")
        self._cancelled.add(name)
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
        history = read_log(folder)
        last = history.iloc[-1].to_dict() if len(history) else {}
        running = self._running(name, folder)
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
        elif name in self._cancelled:
            state, message = "cancelled", "cancelled; resume continues from the last checkpoint"
        elif code not in (None, 0) or self._error_line(folder):
            state, message = "failed", self._error_line(folder) or f"exited with code {code}"
        else:
            state, message = "stopped", "not running; resume continues from the last checkpoint"
        cfg = spec.get("config", {})
        return dict(name=name, state=state, model=spec.get("model"), step=last.get("step"),
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

    def list(self) -> list[dict]:
        """Every run under root, newest first."""
        if not self.root.is_dir():
            return []
        folders = [f for f in self.root.iterdir() if f.is_dir() and _NAME.match(f.name)
                   and ((f / RUN_FILE).is_file() or (f / LOG_FILE).is_file() or (f / "acip.json").is_file()
                        or (f / "tuned.json").is_file())]
        folders.sort(key=lambda f: (self._spec(f) or {}).get("created", f.stat().st_mtime), reverse=True)
        return [self.status(f.name) for f in folders]

    def artifacts(self) -> list[Path]:
        """Folders of finished scoring runs (usable as artifacts)."""
        return [Path(r["folder"]) for r in self.list()
                if r["state"] == "finished" and (Path(r["folder"]) / "acip.json").is_file()]

    def tuned(self) -> list[Path]:
        """Folders of finished fine-tuning runs (tuned sizes; tuned.tuned_sizes lists them per artifact)."""
        return [Path(r["folder"]) for r in self.list()
                if r["state"] == "finished" and (Path(r["folder"]) / "tuned.json").is_file()]

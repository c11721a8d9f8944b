"""The artifacts a server shows: where they are found, and a small registry of loaded Explorers.

`find_artifacts()` lists artifact folders; `Registry.open_explorer(folder, on_progress)` loads an
artifact once (concurrent callers wait for that one load) and keeps the `max_loaded` most recently
used in memory, each holding its base model. Never imports gradio (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from acip_core.artifacts.artifact import problem
from acip_core.artifacts.tuned import tuned_label, tuned_sizes
from acip_core.serving.explorer import Explorer

log = logging.getLogger(__name__)


def find_artifacts(folders=(), precomputed: str | Path | None = None, runs: list | tuple = (),
                   runs_root: str | Path | None = None, tuned: list | tuple = ()) -> list[tuple[str, str]]:
    """(label, folder) of every folder holding an acip.json: `folders` first, then every child of
    `precomputed`, then `runs` (finished scoring runs under `runs_root`). Each artifact is followed
    by its tuned sizes (its tuned/ folder, and those of `tuned`, finished fine-tuning runs, whose
    parent it is). Duplicates are dropped."""
    found = [Path(p) for p in folders]
    if precomputed is not None and Path(precomputed).is_dir():
        found += sorted(p for p in Path(precomputed).iterdir() if p.is_dir())
    found += [Path(p) for p in runs]

    runs_root = Path(runs_root).resolve() if runs_root is not None else None
    first = str(found[0]) if found else None
    choices, seen = [], set()
    for folder in found:
        key = str(folder.resolve())
        if key in seen or not (folder / "acip.json").is_file():
            continue
        if str(folder) != first and problem(folder):  # broken: not offered (validated before listing;
            continue  # the first stays, so the status line says what is wrong with it)
        seen.add(key)
        where = "run" if runs_root is not None and folder.resolve().parent == runs_root \
            else folder.parent.name or "folder"
        choices.append((f"{folder.name} ({where})", str(folder)))
        choices += _tuned_choices(folder, tuned, seen)
    return choices


def _tuned_choices(parent: Path, extra, seen: set) -> list[tuple[str, str]]:
    try:
        found = tuned_sizes(parent, extra)
    except Exception:  # a parent that cannot be read lists no tuned sizes (it is refused on opening)
        return []
    out = []
    for t in found:
        key = str(Path(t["folder"]).resolve())
        if key not in seen:
            seen.add(key)
            out.append((tuned_label(parent.name, t), t["folder"]))
    return out


@dataclass
class Loading:
    """What a load in progress is doing: a phase, a count (done, total) and when it started."""
    phase: str = "starting"
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.perf_counter)
    phase_started: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        """One line: phase, count, elapsed seconds and (with a count) an ETA."""
        elapsed = time.perf_counter() - self.started
        text = self.phase
        if self.total:
            text += f": {self.done}/{self.total}"
            spent = time.perf_counter() - self.phase_started
            if self.done:
                text += f", about {spent / self.done * (self.total - self.done):.0f} s left"
        return f"{text} ({elapsed:.0f} s)"


class Registry:
    """Loaded Explorers by folder (an LRU of `max_loaded`), loads in background threads."""

    def __init__(self, max_loaded: int = 2, opener=Explorer.open):
        self.max_loaded, self._opener = max_loaded, opener
        self._explorers: OrderedDict[str, Explorer] = OrderedDict()
        self._loading: dict[str, tuple[threading.Event, Loading]] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def loaded(self, folder: str) -> Explorer | None:
        with self._lock:
            return self._explorers.get(folder)

    def start(self, folder: str) -> None:
        """Starts loading `folder` in a background thread, unless it is loaded or loading."""
        with self._lock:
            if folder in self._explorers or folder in self._loading:
                return
            self._loading[folder] = (threading.Event(), Loading(
                "loading the base model and the basis (the first load on a machine also converts the "
                "model and builds the basis: minutes on a CPU)"))
        threading.Thread(target=self._load, args=(folder,), daemon=True, name=f"load {folder}").start()

    def _load(self, folder: str) -> None:
        event, state = self._loading[folder]

        def on_basis(i, n):
            if state.total != n:
                state.phase_started = time.perf_counter()
            state.phase = "building the activation-whitened basis (once, then cached): layer"
            state.done, state.total = i, n

        try:
            explorer = self._opener(folder, on_basis)
            with self._lock:
                self._explorers[folder] = explorer
                while len(self._explorers) > self.max_loaded:
                    self._explorers.popitem(last=False)
            self._errors.pop(folder, None)
            log.info("loaded %s in %.1f s", folder, time.perf_counter() - state.started)
        except Exception as err:
            log.exception("loading %s failed", folder)
            self._errors[folder] = f"{type(err).__name__}: {err}"
        finally:
            with self._lock:
                self._loading.pop(folder, None)
            event.set()

    def loading(self, folder: str) -> Loading | None:
        """The state of a load in progress (None when `folder` is not loading)."""
        entry = self._loading.get(folder)
        return entry[1] if entry else None

    def progress(self, folder: str) -> str | None:
        """The line of a load in progress (None when `folder` is not loading)."""
        entry = self._loading.get(folder)
        return entry[1].line() if entry else None

    def wait_lines(self, folder: str, every: float = 0.5):
        """Starts loading `folder`; yields its progress line every `every` s until it is done."""
        self.start(folder)
        while True:
            line = self.progress(folder)
            if line is None:
                return
            yield line
            time.sleep(every)

    def open_explorer(self, folder: str, on_progress=None) -> Explorer:
        """The Explorer of `folder`, loaded once; `on_progress(line)` hears about a load in progress.
        Raises RuntimeError with the load's error when it failed."""
        with self._lock:
            if folder in self._explorers:
                self._explorers.move_to_end(folder)
                return self._explorers[folder]
        for line in self.wait_lines(folder):
            if on_progress:
                on_progress(line)
        explorer = self.loaded(folder)
        if explorer is None:
            raise RuntimeError(f"Could not load the artifact {folder}: {self._errors.get(folder, 'unknown error')}")
        return explorer

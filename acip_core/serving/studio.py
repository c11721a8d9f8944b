"""What the web app needs besides the Explorer, with no gradio in it: its configuration (where
artifacts, runs and downloads live), the artifact list, the loaded-explorer registry, bounded
download folders, and the Studio's verbs the app's handlers call. What the app says (help, tables,
Markdown) is serving/texts.py.

app.py builds the UI from a StudioConfig; tests build one for a temporary folder instead of
patching globals (docs/ARCHITECTURE.md, "Layout").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from acip_core.artifacts.official import import_official
from acip_core.artifacts.tuned import is_tuned, load_tuned
from acip_core.export.anysize import FORMATS, export_anysize
from acip_core.export.push import check_push, push_folder
from acip_core.export.folder import zip_folder
from acip_core.serving import public
from acip_core.serving.explorer import Explorer
from acip_core.serving.jobs import ScoringJobs
from acip_core.serving.registry import Registry, find_artifacts
from acip_core.sources.models import EMBEDDED, cache_dir, hub_offline, hub_reachable, pick_device
from acip_core.training.finetune import check_tunable
from acip_core.training.plan import plan_scoring
from acip_core.training.score import CHECKPOINT_STATE

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NAME = "smollm2-135m-instruct"



def _download_root() -> Path:
    """Inside Gradio's upload folder ($GRADIO_TEMP_DIR, else <tmp>/gradio), so the file handed to
    a download is served from where it was written, not copied into Gradio's cache a second time."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio") / "acip-studio"


@dataclass
class StudioConfig:
    """Where the app finds things. `from_env()` reads ACIP_ARTIFACT and ACIP_RUNS."""
    default_artifact: str = str(ROOT / "precomputed" / DEFAULT_NAME)
    precomputed: Path = ROOT / "precomputed"
    runs: Path = ROOT / "runs"
    artifact_dirs: list = field(default_factory=list)  # extra folders shown first
    downloads: Path = field(default_factory=_download_root)
    max_loaded: int = 2  # artifacts kept in memory at once (each holds its base model)
    # exports + CSVs kept for download, all sessions: the exports limit (ACIP_LIMIT_EXPORTS_BYTES)
    downloads_max_bytes: int = field(default_factory=lambda: int(public.limits().exports_bytes))
    downloads_max_age_s: float = 3600.0

    @classmethod
    def from_env(cls, **overrides) -> "StudioConfig":
        env = {}
        if os.environ.get("ACIP_ARTIFACT"):
            env["default_artifact"] = os.environ["ACIP_ARTIFACT"]
        if os.environ.get("ACIP_RUNS"):
            env["runs"] = Path(os.environ["ACIP_RUNS"])
        return cls(**{**env, **overrides})


class Studio:
    """The app's long-lived objects: scoring jobs and loaded explorers, for one StudioConfig."""

    def __init__(self, config: StudioConfig):
        self.config = config
        self.jobs = ScoringJobs(config.runs)
        self.registry = Registry(config.max_loaded)
        self._names: dict[str, str] = {}  # artifact name -> folder, from the last named_artifacts()

    def artifacts(self) -> list[tuple[str, str]]:
        """(label, folder) of every usable artifact: extra dirs, the default, precomputed/*, runs."""
        c = self.config
        return find_artifacts([*map(str, c.artifact_dirs), c.default_artifact], c.precomputed,
                              self.jobs.artifacts(), self.jobs.root, self.jobs.tuned())

    def default_artifact(self) -> tuple[str | None, str]:
        """The artifact to show first, and a note when it is not the requested one."""
        default = self.config.default_artifact
        if (Path(default) / "acip.json").is_file():
            return default, ""
        choices = self.artifacts()
        hint = (f"The default artifact `{default}` is not there yet (its scoring run may still be in "
                "progress; set `ACIP_ARTIFACT=folder` to choose another).")
        if choices:
            return choices[0][1], f"{hint} Showing `{choices[0][1]}` instead."
        return None, (f"{hint} No other artifact was found: start a scoring run in the **Score** tab, or run "
                      f"`python -m acip_core score --out {self.config.precomputed / DEFAULT_NAME}`.")

    def named_artifacts(self) -> list[tuple[str, str]]:
        """(name, folder) of every usable artifact: the name is its label, made unique (" #2"). The app's
        selectors carry names, never server paths (docs/ARCHITECTURE.md "Public mode")."""
        named, seen = [], {}
        for label, folder in self.artifacts():
            seen[label] = seen.get(label, 0) + 1
            named.append((label if seen[label] == 1 else f"{label} #{seen[label]}", folder))
        self._names = dict(named)  # what folder_of answers from without scanning again
        return named

    def artifact_choices(self) -> list[tuple[str, str]]:
        """The selectors' choices, (label, value): in public mode the value is the name (a visitor never
        sees or sends a server path); locally the folder, as scripts calling the API pass it."""
        named = self.named_artifacts()
        return [(name, name) for name, _ in named] if public.is_public() else named

    def name_of(self, folder: str | None) -> str | None:
        return next((name for name, f in self.named_artifacts() if f == folder), None)

    def choice_of(self, folder: str | None) -> str | None:
        """The selector value that stands for a folder (its name in public mode, else itself)."""
        return self.name_of(folder) if public.is_public() else folder

    def folder_of(self, value) -> str:
        """The folder an artifact name stands for. Local use also takes a listed folder itself (scripts
        and tests call the API with paths); public mode takes names only: never a server path."""
        if not value:
            raise ValueError("Pick an artifact first.")
        value, local = str(value), not public.is_public()
        if value in self._names:  # a name of the last listing: no directory scan per slider event
            return self._names[value]
        if local and self.registry.loaded(value) is not None:
            return value
        names = dict(self.named_artifacts())  # listed since the last listing, or a listed folder (local)
        if value in names:
            return names[value]
        if local and value in names.values():
            return value
        raise ValueError(f"{value[:200]!r} is not one of the available artifacts (choose one by name).")

    def download_dir(self, kind: str, session: str | None = None) -> Path:
        """A fresh folder for one download; old downloads go first (age, then total size), but never
        a session's newest one while it may still be downloading (prune)."""
        root = self.config.downloads / kind
        tag = hashlib.sha256(str(session or "anonymous").encode()).hexdigest()[:8]
        prune(self.config.downloads, self.config.downloads_max_bytes, self.config.downloads_max_age_s,
              replacing=(kind, tag))
        folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}-{os.urandom(4).hex()}"
        folder.mkdir(parents=True)
        return folder

    # -- the verbs of the app's handlers: they call these, never the Studio's parts (.jobs, .registry)
    # nor an Explorer's any-size model (the .importlinter contract "the app calls the serving layer")
    def explorer(self, folder: str) -> Explorer:
        """The loaded Explorer of an artifact folder (loads it, or waits for its load)."""
        return self.registry.open_explorer(folder)

    def preload(self, folder: str) -> None:
        """Starts loading an artifact in the background (the first visitor then waits less)."""
        self.registry.start(folder)

    def loading_lines(self, folder: str):
        """(status line, Loading or None: its counts) while the artifact at `folder` loads."""
        for line in self.registry.wait_lines(folder):
            yield line, self.registry.loading(folder)

    def tuned_sizes(self, ex: Explorer) -> list[dict]:
        """The tuned sizes of an explorer's artifact, the finished fine-tuning runs' included."""
        return ex.tuned_sizes(self.jobs.tuned())

    @staticmethod
    def tuned_target(folder: str) -> float | None:
        """The size a tuned size's artifact was tuned at (its target), or None for an untuned artifact."""
        if not is_tuned(folder):
            return None
        return load_tuned(folder).meta.target

    def clean_at_start(self) -> None:
        """Removes what killed processes left in the downloads, the model cache, the runs and
        precomputed (public.clean_at_start)."""
        public.clean_at_start(exports=self.config.downloads / "exports",
                              roots=[cache_dir(), self.jobs.root, self.config.precomputed])

    # runs (scoring and fine-tuning: serving/jobs.py)
    def runs(self) -> list[dict]:
        return self.jobs.list()

    def run_names(self) -> list[str]:
        return [r["name"] for r in self.jobs.list()]

    def run_status(self, run: str) -> dict:
        return self.jobs.status(run)

    def run_history(self, run: str) -> pd.DataFrame:
        return self.jobs.history(run)

    def run_output_tail(self, run: str, lines: int = 20) -> str:
        return self.jobs.output_tail(run, lines)

    def resume_step(self, run: str) -> int | None:
        """The step a stopped run's last checkpoint holds (Resume continues after it), or None."""
        return checkpoint_step(self.jobs.folder(run))

    def start_scoring(self, name: str, **settings) -> dict:
        """A background scoring run (ScoringJobs.start: its settings and checks)."""
        return self.jobs.start(name, **settings)

    def start_finetune(self, name: str, folder: str, ratio: float, format: str, **settings) -> dict:
        """A background fine-tuning run of one size of an artifact (ScoringJobs.start_finetune). A size
        with nothing to tune is refused now, by fine-tuning's own rule (training/finetune.py
        `check_tunable`), not by a run that fails a second later; a tuned size's artifact is refused
        by start_finetune itself."""
        ex = self.explorer(folder)
        if not ex.tuned:
            check_tunable(ex.any_size, ex.size(ratio), format)
        return self.jobs.start_finetune(name, str(folder), float(ratio), format=format, **settings)

    def cancel_run(self, run: str, who: str | None = None) -> dict:
        return self.jobs.cancel(run, who=who)

    def delete_run(self, run: str, who: str | None = None) -> None:
        self.jobs.delete(run, who=who)

    def resume_run(self, run: str, who: str | None = None) -> dict:
        return self.jobs.resume(run, who=who)

    # exports (export/)
    @staticmethod
    def any_size_formats(stored: str) -> list[str]:
        """The formats an any-size folder of `stored` weights (float32 or bfloat16) offers."""
        return list(FORMATS[stored])

    @staticmethod
    def export_any_size(ex: Explorer, out: Path, stored: str) -> Path:
        """The explorer's artifact as one any-size folder (export/anysize.py) with its curve."""
        return export_anysize(ex.any_size, out, stored, curve=ex.curve, card=dict(artifact=ex.name))

    @staticmethod
    def zip_folder(folder: Path, zip_path: Path) -> Path:
        return zip_folder(folder, zip_path)

    def push(self, folder: str, ratio, dense: bool | None, format: str, repo_id: str, token, private: bool,
             on_stage=lambda stage: None) -> str:
        """Exports a size of the artifact at `folder` (dense or low-rank; dense=None: every size, as one
        any-size folder) and uploads it to the hub as `repo_id`; the repository id, the token and the
        network are checked before any work, the artifact's load included (export/push.py). Returns the
        repository's URL."""
        import tempfile

        repo_id = str(repo_id or "").strip()
        token = check_push(repo_id, token)
        ex = self.explorer(folder)
        work = Path(tempfile.mkdtemp(prefix=".share-", dir=self.download_dir("exports")))
        try:
            on_stage("exporting")
            out = work / "model"
            if dense is None:
                self.export_any_size(ex, out, "bfloat16" if format == "bfloat16" else "float32")
            else:
                ex.export(ratio, out, dense=dense, format=format)
            on_stage("uploading")
            return push_folder(out, repo_id, token, bool(private))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def import_official(self, source: str, name: str = "", on_progress=None) -> str:
        """Converts an official ACIP checkpoint (hub id or folder) into precomputed/<name> (local mode
        only: artifacts/official.py); the artifact list then shows it. Returns the name."""
        import re

        if public.is_public():
            raise ValueError("importing official ACIP models is available locally only")
        source, name = str(source or "").strip(), str(name or "").strip()
        if not source:
            raise ValueError("give a hub id (e.g. MerantixMomentum/acip_llama31_8b) or a checkpoint folder")
        name = name or source.rstrip("/").rsplit("/", 1)[-1]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError(f"artifact name {name!r}: use letters, digits and -_. (it becomes a folder)")
        import_official(source, self.config.precomputed / name, on_progress=on_progress)
        return name

    # what the host offers
    @staticmethod
    def plan_run(model: str, batch_size: int, seq_len: int):
        """The memory plan of a scoring run of `model` (training/plan.py: from the config alone, no
        weights read) on this host's device."""
        return plan_scoring(model, batch_size, seq_len, device=Studio.device_name(), probe=False)

    @staticmethod
    def lm_eval_tasks() -> tuple[list[str], list[str]]:
        """(offline tasks, all suggested tasks) of evaluation/lmeval.py; ([], []) where it cannot load."""
        try:
            from acip_core.evaluation.lmeval import OFFLINE_TASKS, PAPER_TASKS
        except Exception:  # noqa: BLE001 - the Measure tab then offers no task, the rest works
            return [], []
        return list(OFFLINE_TASKS), list(OFFLINE_TASKS) + [t for t in PAPER_TASKS if t not in OFFLINE_TASKS]

    @staticmethod
    def device_name() -> str:
        """Where scoring runs here: "cuda" or "cpu"."""
        return pick_device().type


DOWNLOAD_GRACE_S = 600.0  # a visitor's newest download is kept this long whatever the size bound


def prune(root: Path, max_bytes: int, max_age_s: float, grace_s: float = DOWNLOAD_GRACE_S,
          replacing: tuple[str, str] | None = None) -> None:
    """Deletes download folders (root/<kind>/<time>-<session tag>-<random>) older than max_age_s,
    then the oldest until the rest holds at most max_bytes, sparing each session's newest folder
    of each kind while it is younger than grace_s (a link its visitor was just given: another
    visitor's export must not take it away mid-download; the bound may be passed by those).
    `replacing` (kind, session tag): that session is being given a newer one, so its old one may go."""
    entries, now = [], time.time()
    for kind in (root.iterdir() if root.is_dir() else ()):
        for one in (kind.iterdir() if kind.is_dir() else ()):
            try:
                size = sum(f.stat().st_size for f in one.rglob("*") if f.is_file()) if one.is_dir() \
                    else one.stat().st_size
                entries.append((one.stat().st_mtime, size, one))
            except OSError:
                continue
    entries.sort()
    newest = {}  # (kind, session tag) -> (mtime, its newest folder)
    for mtime, _, one in entries:
        parts = one.name.split("-")
        if len(parts) >= 4:  # named by download_dir (else: not a visitor's, never spared)
            newest[(one.parent.name, parts[2])] = (mtime, one)
    spared = {one for key, (mtime, one) in newest.items() if now - mtime <= grace_s and key != replacing}
    total = sum(e[1] for e in entries)
    for mtime, size, one in entries:
        old = now - mtime > max_age_s
        if not old and (total <= max_bytes or one in spared):
            continue
        shutil.rmtree(one, ignore_errors=True) if one.is_dir() else one.unlink(missing_ok=True)
        total -= size


def check_model_source(source: str, reachable=None) -> None:
    """Refuses at once a hub id that can only fail: not in the local cache while the hub is
    unreachable (huggingface_hub would retry for about a minute first). ValueError says why."""
    source = (source or "").strip()
    if source == EMBEDDED or Path(source).expanduser().exists() or source.count("/") != 1:
        return  # embedded, a local folder, or something models.load_base refuses at once itself
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return

    reachable = reachable or hub_reachable
    offline = hub_offline()
    if offline or not reachable():
        raise ValueError(f"{source!r} is not in the local Hugging Face cache and the hub is "
                         f"{'switched off (HF_HUB_OFFLINE)' if offline else 'not reachable'}: download it "
                         f"once online, give a local model folder, or use the embedded {EMBEDDED!r}.")


def checkpoint_step(run_folder: Path) -> int | None:
    """The step a scoring run's last checkpoint holds (what --resume continues after), or None."""
    import json

    try:
        return int(json.loads((Path(run_folder) / CHECKPOINT_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

"""What the web app needs besides the Explorer, with no gradio in it: its configuration (where
artifacts, runs and downloads live), the artifact list, the loaded-explorer registry, bounded
download folders, and the texts that describe a size, a budget and a measurement.

app.py builds the UI from a StudioConfig; tests build one for a temporary folder instead of
patching globals (docs/ARCHITECTURE.md, "Layout").
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from acip_core.serving import public
from acip_core.evaluation.curve import eval_set_label
from acip_core.serving.explorer import Explorer
from acip_core.serving.jobs import ScoringJobs
from acip_core.serving.registry import Registry, find_artifacts
from acip_core.system.units import format_gb, gb_up  # noqa: F401  (gb_up: the app's budget box)

# the "What am I looking at?" panel (its README references are section titles)
HELP = """
**ACIP** (Any Compression via Iterative Pruning; Genzel et al., 2025) factorizes every linear layer of
a language model by SVD and runs one scoring pass that ranks *all* singular values of *all* layers by
how much the model needs them. Any size is then a prefix of that ranking: no retraining per size.

- **Size ratio**: the kept fraction of the compressed layers' parameters (1.0 = the original model).
  Embeddings, norms and the output head are never compressed, which is why the total parameters and
  the **GB** shrink less than the ratio; GB also depends on the weights' dtype (2 bytes in bfloat16,
  4 in float32).
- **The curve**: perplexity (lower is better) at each size on an evaluation text. `acip` is this
  artifact; the other lines are baselines measured on the same text: `svd-magnitude` and
  `whitened-magnitude` keep the largest singular values (of the plain or activation-whitened layers),
  `uniform-whitened` cuts every layer by the same fraction, `block-removal` drops whole decoder blocks.
  The dashed line is the original model.
- **Evaluation sets**: *heldout* is held-out handbook text (never used for calibration); *domain* is
  a domain never seen in calibration (Python's help topics).
- **Chat / Sweep** answer greedily, so different sizes differ only by their size.

More in the README: *The app*, *How it works (short)*, *Measured numbers*; the method in
[the paper](https://arxiv.org/abs/2502.01717).
"""
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
        from acip_core.artifacts.tuned import is_tuned, load_tuned

        if not is_tuned(folder):
            return None
        return load_tuned(folder).meta.target

    def clean_at_start(self) -> None:
        """Removes what killed processes left in the downloads, the model cache, the runs and
        precomputed (public.clean_at_start)."""
        from acip_core.sources.models import cache_dir

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
        from acip_core.training.finetune import check_tunable

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
        from acip_core.export.anysize import FORMATS

        return list(FORMATS[stored])

    @staticmethod
    def export_any_size(ex: Explorer, out: Path, stored: str) -> Path:
        """The explorer's artifact as one any-size folder (export/anysize.py) with its curve."""
        from acip_core.export.anysize import export_anysize

        return export_anysize(ex.any_size, out, stored, curve=ex.curve, card=dict(artifact=ex.name))

    @staticmethod
    def zip_folder(folder: Path, zip_path: Path) -> Path:
        from acip_core.export.sized import zip_folder

        return zip_folder(folder, zip_path)

    def push(self, folder: str, ratio, dense: bool | None, dtype: str, repo_id: str, token, private: bool,
             on_stage=lambda stage: None) -> str:
        """Exports a size of the artifact at `folder` (dense or low-rank; dense=None: every size, as one
        any-size folder) and uploads it to the hub as `repo_id`; the repository id, the token and the
        network are checked before any work, the artifact's load included (export/push.py). Returns the
        repository's URL."""
        import tempfile

        from acip_core.export.push import check_push, push_folder

        repo_id = str(repo_id or "").strip()
        token = check_push(repo_id, token)
        ex = self.explorer(folder)
        work = Path(tempfile.mkdtemp(prefix=".share-", dir=self.download_dir("exports")))
        try:
            on_stage("exporting")
            out = work / "model"
            if dense is None:
                self.export_any_size(ex, out, "bfloat16" if dtype == "bfloat16" else "float32")
            else:
                ex.export(ratio, out, dense=dense, dtype=dtype)
            on_stage("uploading")
            return push_folder(out, repo_id, token, bool(private))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def import_official(self, source: str, name: str = "", on_progress=None) -> str:
        """Converts an official ACIP checkpoint (hub id or folder) into precomputed/<name> (local mode
        only: artifacts/official.py); the artifact list then shows it. Returns the name."""
        import re

        from acip_core.artifacts.official import import_official

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
        from acip_core.training.plan import plan_scoring

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
        from acip_core.sources.models import pick_device

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
    from acip_core.sources.models import EMBEDDED

    source = (source or "").strip()
    if source == EMBEDDED or Path(source).expanduser().exists() or source.count("/") != 1:
        return  # embedded, a local folder, or something models.load_base refuses at once itself
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    from acip_core.sources.models import hub_offline, hub_reachable

    reachable = reachable or hub_reachable
    offline = hub_offline()
    if offline or not reachable():
        raise ValueError(f"{source!r} is not in the local Hugging Face cache and the hub is "
                         f"{'switched off (HF_HUB_OFFLINE)' if offline else 'not reachable'}: download it "
                         f"once online, give a local model folder, or use the embedded {EMBEDDED!r}.")


def checkpoint_step(run_folder: Path) -> int | None:
    """The step a scoring run's last checkpoint holds (what --resume continues after), or None."""
    import json

    from acip_core.training.score import CHECKPOINT_STATE

    try:
        return int(json.loads((Path(run_folder) / CHECKPOINT_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- texts ------------------------------------------------------------------------------------------
def millions(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n:,}"


FINETUNE_HELP = (
    "Trains the LoRA of the selected size (its factors frozen, in the selected format) to win back "
    "quality, as a background run you follow in the **Score** tab. **kd** distills the original model's "
    "next-token distribution (it is the full size of the same model: no second download); **lm** learns "
    "the next tokens of the calibration text; **lm+kd** both (the default: the best balance of held-out "
    "text and an unseen domain). 2.4–14 s per step on 2 CPU cores for the embedded model, by size, "
    "objective and CPU (benchmarks/RESULTS.md). The tuned size then appears in the artifact list and as "
    "a ▼ on the curve.")


def describe_text(info: dict) -> str:
    """The status line of a loaded artifact (Explorer.describe())."""
    from acip_core.serving.public import md_escape  # an artifact's fields may come from a visitor's run: shown as text

    info = {k: md_escape(str(v)) if isinstance(v, str) else v for k, v in info.items()}
    how = (f"imported from the official ACIP checkpoint {info['imported_from']} (their sizes: their size rule)"
           if info.get("imported_from") else
           f"scored for {info['steps']} steps down to size {info['stopped_at']}")
    line = (f"**{info['name']}**: {info['model']} ({info['architecture']}), {info['target_layers']} "
            f"compressed layers, {info['basis']} basis, {how}. Ready.")
    if info.get("tuned"):
        t = info["tuned"]
        line += (f" A **tuned size**: its LoRA was fine-tuned at size {t['size_ratio']:.3f} in {t['format']}, "
                 "where the slider is set; other sizes use the same LoRA but were not tuned for it.")
    return line


def below_range_note(size_ratio: float, smallest: float | None) -> str:
    """A warning for sizes under the smallest size the curve measured ('' otherwise)."""
    if smallest is None or size_ratio >= smallest - 1e-9:
        return ""
    return (f"Below the smallest measured size ({smallest:.2f}): quality unknown and likely unusable "
            "(very small sizes often answer with nothing).")


def summary_frame(s: dict, at: dict, note: str = "") -> pd.DataFrame:
    """The summary table of a size (Explorer.size_for) with what the curve says there (curve_at)."""
    rows = [("size ratio (target layers)", f"{s['size_ratio']:.4f}"),
            ("parameters", f"{millions(s['params'])} of {millions(s['original_params'])} "
                           f"({100 * s['params_fraction']:.1f} %)"),
            (f"weights in {s['format']}", format_gb(s["gb"])),
            ("in every format", " · ".join(f"{k} {format_gb(v)}" for k, v in s["gb_by_format"].items())),
            ("layers", f"{s['low_rank_layers']} low-rank · {s['dense_layers']} dense (of {s['layers']})"),
            ("kept singular values", f"{100 * s['kept_rank_fraction']:.1f} %")]
    if at.get("metric"):
        label = eval_set_label(at["metric"])
        if at["value"] is not None:
            ref = f" (original {at['original']:.1f})" if at["original"] else ""
            rows.append((f"perplexity (curve: {label})", f"≈ {at['value']:.1f}{ref}"))
        elif at["span"] is not None:
            rows.append((f"perplexity on {label}", f"outside the curve's sizes {at['span'][0]:.2f}–"
                                                   f"{at['span'][1]:.2f}: measure it in the Measure tab"))
    if note:
        rows.append(("warning", note))
    return pd.DataFrame(rows, columns=["", "this size"])


def size_badge(s: dict, note: str = "") -> str:
    """One line, visible on every tab: the size that Chat (A), Measure, Sweep and Export use."""
    text = (f"**Selected size {s['size_ratio']:.3f}**: {millions(s['params'])} params, "
            f"{format_gb(s['gb'])} in {s['format']}")
    return text + (f"  \n⚠ {note}" if note else "")


def slider_ratio(ratio: float) -> float:
    """A size ratio as the slider holds it (3 decimals, rounded down: that value still fits a budget);
    every text that names a budget's size uses this, so it reads as the slider does."""
    return math.floor(float(ratio) * 1000 + 1e-6) / 1000


def budget_text(budget_gb: float, answer: dict) -> str:
    """The budget's answer in every format (Explorer.budget_answer), best first named, and what decided
    it; never calls an unmeasured size measured."""
    fits = answer["rows"]
    lines = [f"**{budget_gb:g} GB** fits:", "", "| format | size | weights | left | perplexity |",
             "|---|---|---|---|---|"]
    for f in fits:
        if not f["fits"]:
            lines.append(f"| {f['dtype']} | — | needs ≥ {format_gb(f['smallest_gb'])} | | |")
            continue
        # no perplexity: a size outside the curve's measured sizes
        ppl = f"≈ {f['perplexity']:.1f}" if f.get("perplexity") is not None else "not measured"
        mark = " **(best)**" if f.get("best") else ""
        lines.append(f"| {f['dtype']}{mark} | **{slider_ratio(f['size_ratio']):.3f}** | {format_gb(f['gb'])} | "
                     f"{format_gb(f['budget_left_gb'], left=True)} | {ppl} |")
    best = answer.get("best")
    if best and answer.get("measured"):
        lines += ["", f"The slider moved to the best: size {slider_ratio(best['size_ratio']):.3f} in {best['dtype']}, "
                      f"{answer['rule']}. The runners-up are the other rows."]
    elif best:
        small = answer.get("smallest_measured")
        need = (f" The smallest measured model is size {small['size_ratio']:.3f} in {small['format']}: it needs "
                f"{format_gb(small['gb'])}." if small else "")
        lines += ["", f"No size that fits was measured: the slider moved to the largest that fits, size "
                      f"{slider_ratio(best['size_ratio']):.3f} in {best['dtype']}, whose quality is unknown "
                      f"(an extrapolation, likely unusable).{need}"]
    return "\n".join(lines)


def perplexity_text(row: dict, min_windows: int = 32) -> str:
    """A measured perplexity with its spread, and a warning when it cannot be told from the curve.
    One window has no spread (a standard error needs two): that is said, never "± 0 %"."""
    where = (f"at size {row['size_ratio']:.3f} ({row['dtype']}) on {row['data']}: {row['windows']} "
             f"window{'s' if row['windows'] != 1 else ''} × {row['seq_len']} tokens in {row['seconds']:.1f} s "
             f"({row['tokens_per_s']:.0f} tokens/s). Added to the curve (this session only).")
    if row["windows"] < 2:
        return (f"Perplexity **{row['perplexity']:.1f}** {where}  \n⚠ One window: no spread can be "
                f"measured (it needs at least two), so this value cannot be compared; use ≥ {min_windows}.")
    text = (f"Perplexity **{row['perplexity']:.1f}** (± one standard error: {row['ppl_low']:.1f}–"
            f"{row['ppl_high']:.1f}) {where}")
    curve = row.get("curve_perplexity")
    if curve is not None and row["ppl_low"] <= curve <= row["ppl_high"]:
        text += (f"  \n⚠ The curve says ≈ {curve:.1f} here, inside this measurement's spread: "
                 f"{row['windows']} windows cannot tell them apart; use more windows (≥ {min_windows}).")
    elif row["windows"] < min_windows:
        text += f"  \n⚠ Only {row['windows']} windows: the value moves by ± {_pct(row)} % from text alone."
    return text


def _pct(row: dict) -> str:
    return f"{100 * (row['ppl_high'] / row['perplexity'] - 1):.0f}"


def speed_line(tag: str, snap: dict) -> str:
    parts = [f"**{tag}** size {snap['size_ratio']:.3f}"]
    if snap["first_token_s"] is not None:
        parts.append(f"first token {snap['first_token_s']:.2f} s")
    if snap["tokens_per_s"]:
        parts.append(f"{snap['tokens_per_s']:.1f} tok/s")
    parts.append(f"{snap['tokens']} tokens")
    if snap["truncated"]:
        parts.append("(older turns dropped to fit the context)")
    if snap["done"]:
        parts.append("done")
    return " · ".join(parts)


def throttled(stream, every: float = 0.2):
    """The items of `stream`, at most one per `every` seconds (the latest), and always the last.
    Each item a chat yields is serialized and sent to the browser by the server's thread, which
    takes the GIL from the generation thread: one update per token slowed decoding down."""
    last, pending, item = 0.0, False, None
    for item in stream:
        pending = True
        now = time.perf_counter()
        if now - last >= every:
            last, pending = now, False
            yield item
    if pending:
        yield item


def parse_sizes(text: str, limit: int = 12) -> list[float]:
    """'1.0, 0.9, 0.8' (or '1.0:0.4:0.1' for a range) -> distinct sizes in [0, 1], largest first."""
    text = (text or "").strip()
    try:
        if text.count(":") == 2:
            hi, lo, step = (float(x) for x in text.split(":"))
            if not step > 0:
                raise ValueError
            sizes = [round(hi - i * step, 6) for i in range(int(math.floor((hi - lo) / step + 1e-9)) + 1)]
        else:
            sizes = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"sizes must be numbers separated by commas (e.g. 1.0, 0.8, 0.6) or "
                         f"a range high:low:step (e.g. 1.0:0.4:0.1), got {text!r}") from None
    sizes = sorted({s for s in sizes}, reverse=True)
    if not sizes or any(not (math.isfinite(s) and 0 <= s <= 1) for s in sizes):
        raise ValueError(f"every size must be within [0, 1], got {text!r}")
    if len(sizes) > limit:
        raise ValueError(f"at most {limit} sizes per sweep, got {len(sizes)}")
    return sizes


# -- tables ----------------------------------------------------------------------------------------
def layers_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Explorer.layer_table with short module names and column titles."""
    table = table.rename(columns={"full_rank": "full rank", "mean_kept_rank": "kept rank",
                                  "kept_percent": "kept %", "low_rank": "low-rank"})
    table["module"] = table["module"].str.removesuffix("_proj")
    return table


def reply(snap: dict) -> str:
    """A chat reply as shown: an empty finished reply says why instead of an empty bubble (at once,
    or tokens that show no text: special or white-space tokens). The panes show plain text."""
    if snap["done"] and not snap["text"].strip():
        if snap.get("tokens"):
            return (f"(no visible text: the model's {snap['tokens']} tokens at this size are special or "
                    "white-space tokens)")
        return "(no text: the model ended its reply at once at this size)"
    return snap["text"]


def metric_value(value) -> str:
    """An lm-eval figure: counts (samples) as whole numbers, scores with 3 decimals."""
    return f"{int(value):,}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.3f}"


def eta_text(done: int, total: int, elapsed_s: float) -> str:
    """"ETA 1 min 05 s" from the rate so far ('' before the first count)."""
    if done <= 0 or total <= done or elapsed_s <= 0:
        return ""
    left = elapsed_s / done * (total - done)
    return f"ETA {int(left // 60)} min {int(left % 60):02d} s" if left >= 60 else f"ETA {left:.0f} s"


def results_table(results) -> pd.DataFrame:
    """The session's results, newest first, the measured value (with its spread) up front."""
    frame = pd.DataFrame(list(results or [])[::-1])
    if "perplexity" in frame:
        frame.insert(3, "± (one s.e.)", [f"{lo:.1f}–{hi:.1f}" if pd.notna(lo) and (pd.isna(w) or w >= 2) else
                                         "no spread (1 window)" if pd.notna(lo) else "" for lo, hi, w in
                                         zip(frame.get("ppl_low", []), frame.get("ppl_high", []),
                                             frame.get("windows", [float("nan")] * len(frame)))])
        frame["perplexity"] = frame.perplexity.round(2)
    metrics = [c for c in frame.columns if "/" in c]
    keep = ["time", "kind", "size_ratio", "dtype", "data"] + metrics + \
        [c for c in ("perplexity", "± (one s.e.)", "windows", "seconds") if c in frame]
    return frame[[c for c in keep if c in frame]].round(4) if len(frame) else frame


def sweep_frame(ex, ratios, snaps) -> pd.DataFrame:
    """The sweep grid: one row per size (Explorer.sweep snapshots so far; later sizes blank)."""
    rows = []
    for i, ratio in enumerate(ratios):
        snap = snaps[i] if i < len(snaps) else None
        size = ex.size(ratio)
        rows.append({"size": f"{size.size_ratio:.3f}", "params": millions(size.params),
                     "reply": "" if snap is None else reply(snap) + ("" if snap["done"] else " …"),
                     "tok/s": "" if snap is None or not snap["tokens_per_s"] else f"{snap['tokens_per_s']:.1f}"})
    return pd.DataFrame(rows)


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """The Score tab's table of runs (ScoringJobs.list())."""
    rows = []
    for r in runs:
        eta = f"≤ {int(r['eta_s'] // 60)} min {int(r['eta_s'] % 60)} s" if r["eta_s"] is not None else ""
        rows.append(dict(run=r["name"], state=r["state"], step=r["step"], phase=r["phase"],
                         loss=None if r["loss"] is None else round(r["loss"], 4),
                         λ=None if r["reg_weight"] is None else f"{r['reg_weight']:.3g}",
                         size_ratio=None if r["size_ratio"] is None else round(r["size_ratio"], 4),
                         elapsed_s=None if r["seconds"] is None else round(r["seconds"]), ETA=eta))
    return pd.DataFrame(rows, columns=["run", "state", "step", "phase", "loss", "λ", "size_ratio",
                                       "elapsed_s", "ETA"])


def plan_text(source: str, plan) -> str:
    """The Score tab's memory plan of a model and settings (Studio.plan_run), as Markdown."""
    from acip_core.training.plan import GiB

    lines = [f"**Memory plan** of {public.md_escape(source)} at batch {plan.settings['batch_size']} × "
             f"{plan.settings['seq_len']} tokens ({plan.settings['precision_used']}, on {plan.settings['device']}; "
             "an estimate from the config, no weights read):"]
    for where in plan.scoring_where:
        phases = plan.phase_bytes(where)
        avail = plan.available.get(where)
        verdict = "" if avail is None else (f" of {avail / GiB:.1f} GiB free now: **fits**" if plan.needed(where) <= avail
                                            else f" of {avail / GiB:.1f} GiB free now: **does not fit** (a start is refused)")
        lines.append(f"- scoring needs **{plan.needed(where) / GiB:.2f} GiB** of {where.upper()}{verdict} "
                     f"(steps {phases.get('steps', 0) / GiB:.2f}, first basis build {phases.get('basis build', 0) / GiB:.2f})")
    big = sorted((t for t in plan.terms if "steps" in t.phases), key=lambda t: -t.bytes)[:4]
    lines.append("- largest terms: " + ", ".join(f"{t.name} {t.bytes / GiB:.2f} GiB" for t in big))
    lines.append(f"- serving it here afterwards: {plan.needed('ram', ('serve',)) / GiB:.2f} GiB "
                 "(`python -m acip_core plan` lists every term)")
    return "\n".join(lines)


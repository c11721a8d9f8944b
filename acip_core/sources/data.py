"""Text sources (the offline corpus, local files, `datasets` when online) and token windows.

Named corpus splits (files in assets/corpus/, see its SOURCES.md):
- corpus:broad    the default calibration mix: the first 80 % of the handbook, the first 15 % of the
                  fortunes, text sampled from SmolLM2 itself on diverse prompts, and 0.8 MB of manual
                  pages (assets/corpus/make_manpages.py), another kind of reference prose
- corpus:broad-code  corpus:broad with 0.6 MB of programming reference as well: manual pages of C
                  system calls and library functions and of Perl modules (sections 2 and 3; never Python)
- corpus:broad-wide  corpus:broad with the model's own text on 122 subjects (code, maths, science,
                  practical and civic topics as well as stories) instead of 48: smollm2_samples_wide.txt
- corpus:handbook-train  the first 80 % of the handbook alone: the held-out text's own kind of prose
                  (fine-tuning a size for that text; never its last 20 %)
- corpus:train    the first mix (no manual pages, 30 % of the fortunes): narrower; kept for comparison
- corpus:heldout  in-domain held-out text: the last 20 % of the handbook (never calibrated on)
- corpus:domain   a held-out *domain*: Python's help topics (never calibrated on)
- corpus:<file>   one whole file, e.g. corpus:fortunes
Anything else is a local text file, or `hf:NAME[:CONFIG][:SPLIT]` for a `datasets` dataset (online).
"""

from __future__ import annotations

from pathlib import Path

import torch

from acip_core.sources.models import cache_dir, datasets_offline
from acip_core.system.limits import is_public

CORPUS_DIR = Path(__file__).resolve().parents[2] / "assets" / "corpus"
CORPUS_FILES = {"handbook": "debian_handbook.txt", "fortunes": "fortunes.txt", "pydoc": "pydoc_topics.txt",
                "samples": "smollm2_samples.txt", "manpages": "manpages.txt",
                "samples-wide": "smollm2_samples_wide.txt", "manpages-dev": "manpages_dev.txt"}
TRAIN_FRACTION = 0.8
SPLITS = {
    "train": [("handbook", 0.0, TRAIN_FRACTION), ("fortunes", 0.0, 0.3), ("samples", 0.0, 1.0)],
    "broad": [("handbook", 0.0, TRAIN_FRACTION), ("fortunes", 0.0, 0.15), ("samples", 0.0, 1.0),
              ("manpages", 0.0, 1.0)],
    "broad-code": [("handbook", 0.0, TRAIN_FRACTION), ("fortunes", 0.0, 0.15), ("samples", 0.0, 1.0),
                   ("manpages", 0.0, 1.0), ("manpages-dev", 0.0, 1.0)],
    "broad-wide": [("handbook", 0.0, TRAIN_FRACTION), ("fortunes", 0.0, 0.15), ("samples-wide", 0.0, 1.0),
                   ("manpages", 0.0, 1.0)],
    "handbook-train": [("handbook", 0.0, TRAIN_FRACTION)],
    "train-books": [("handbook", 0.0, TRAIN_FRACTION), ("fortunes", 0.0, TRAIN_FRACTION)],
    "heldout": [("handbook", TRAIN_FRACTION, 1.0)],
    "domain": [("pydoc", 0.0, 1.0)],
}
DEFAULT_DATA = "corpus:broad"  # the calibration text of new runs and of the shipped artifact
DATA_CHOICES = ["corpus:" + s for s in SPLITS] + ["corpus:" + f for f in CORPUS_FILES]


class DataSourceError(ValueError):
    """A text source that cannot be read, with a message that says why."""


def _corpus_part(name: str, start: float, end: float) -> str:
    path = CORPUS_DIR / CORPUS_FILES[name]
    if not path.is_file():
        raise DataSourceError(f"corpus file {path} is missing")
    text = path.read_text(encoding="utf-8")
    a, b = int(len(text) * start), int(len(text) * end)
    # cut at paragraph boundaries so no split shares a half paragraph with another
    if a:
        a = text.find("\n\n", a) + 2 if text.find("\n\n", a) >= 0 else a
    if b < len(text):
        b = text.find("\n\n", b) if text.find("\n\n", b) >= 0 else b
    return text[a:b]


# -- what a visitor may name (public mode: README "Public deployment") ---------------------------
def uploads_dir() -> Path:
    """Where accepted calibration uploads are kept (bounded: limits().uploads_bytes)."""
    return cache_dir() / "uploads"


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def check_data(source, env=None) -> str:
    """A text field's value: in public mode only an offered corpus name or an accepted upload."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"choose a text: one of {DATA_CHOICES} or an uploaded file")
    source = source.strip()
    if is_public(env) and source not in DATA_CHOICES and not _inside(Path(source), uploads_dir()):
        raise ValueError(f"on this public Space the text is one of {DATA_CHOICES} or a file you upload; "
                         "server paths and hf: datasets are not accepted")
    return source


def load_text(source: str) -> str:
    """The text of a named corpus split, a local file, or an `hf:` dataset."""
    if source.startswith("corpus:"):
        key = source.split(":", 1)[1]
        if key in SPLITS:
            return "\n\n".join(_corpus_part(*part) for part in SPLITS[key])
        if key in CORPUS_FILES:
            return _corpus_part(key, 0.0, 1.0)
        raise DataSourceError(f"unknown corpus part {key!r}; choose one of {DATA_CHOICES}")
    if source == "corpus":
        return load_text(DEFAULT_DATA)
    if is_public():  # the serving layer checks what a visitor names; this holds for any other caller
        check_data(source)
    if source.startswith("hf:"):
        return _load_hf(source[3:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataSourceError(f"no text at {source!r}: give a file, one of {DATA_CHOICES}, "
                              "or hf:NAME[:CONFIG][:SPLIT]")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataSourceError(f"{path} is not UTF-8 text") from None


def _load_hf(spec: str) -> str:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    if datasets_offline():
        raise DataSourceError(f"hf:{spec} needs the internet (HF offline mode is set); "
                              "use a local text file or the offline corpus (corpus:train)")
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        texts, column, size = [], None, 0
        for row in ds:  # the paper's calibration: whole documents, in stream order
            if column is None:  # `text`, else `page`, else the first column holding strings
                column = next((k for k in ("text", "page") if k in row), None) or \
                    next((k for k, v in row.items() if isinstance(v, str)), None)
                if column is None:
                    raise DataSourceError(f"no text column (columns: {', '.join(map(str, row))})")
            value = row.get(column)
            if isinstance(value, str) and value:  # an empty or missing document is skipped
                texts.append(value)
                size += len(value)
            if size > 4_000_000:
                break
        return "\n\n".join(texts)
    except Exception as err:
        raise DataSourceError(f"could not load hf:{spec} ({err.__class__.__name__}: "
                              f"{str(err)[:200]}); offline? use corpus:train or a text file") from None


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of the tokenized text (a short tail is dropped)."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataSourceError(f"text too short: {len(ids)} tokens for one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


class BatchStream:
    """Deterministic batches by step index: batch(step) is the same in a resumed run."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int):
        if len(windows) < batch_size:
            raise DataSourceError(f"{len(windows)} windows for a batch of {batch_size}")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.per_epoch = len(windows) // batch_size

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        perm = torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(self.seed + epoch))
        return self.windows[perm[i * self.batch_size:(i + 1) * self.batch_size]]

"""The app's engine: one artifact's any-size model, a small cache of materialized sizes, and the
thread-safe jobs the UI asks for. Never imports gradio.

The Explorer owns the any-size model, the size and model caches and their lock, and answers for
sizes, budgets and tables itself; chat (serving/chat.py), measurements (serving/measure.py) and
export (serving/exports.py) are mixins that work on what it owns.

Every public method takes a size_ratio (a float in [0, 1]); a size is looked up by its global prefix,
so two ratios that select the same ranks share one materialized model. Materialized models are
independent module trees over shared read-only factors (materialize.py), so concurrent calls at
different sizes never interfere and nothing global is mutated under a running generation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from acip_core.artifacts.open import open_folder
from acip_core.artifacts.tuned import tuned_label, tuned_sizes
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.evaluation.curve import rank_for_budget, rule_text, smallest_measured
from acip_core.serving.chat import ChatMixin
from acip_core.serving.checks import FORMAT_CHOICES, check_budget, check_format, check_ratio
from acip_core.serving.exports import ExportMixin
from acip_core.serving.gate import GATE
from acip_core.serving.measure import MeasureMixin


class Explorer(ChatMixin, MeasureMixin, ExportMixin):
    """One artifact, ready to answer: sizes, budgets and tables here; chat, measurements and exports
    from its mixins (serving/chat.py, serving/measure.py, serving/exports.py), which work on what this
    class owns: the any-size model, the size and model caches, and the lock that guards them.

    Args:
        any_size: the artifact's AnySizeModel.
        curve: the artifact's curve.csv as a DataFrame (None when it has none).
        name: a display name (the artifact folder's name).
        cache_size: how many materialized (size, format) models to keep.
    """

    def __init__(self, any_size: AnySizeModel, curve: pd.DataFrame | None = None, name: str = "",
                 folder: str | Path | None = None, cache_size: int = 4):
        self.any_size, self.curve, self.name = any_size, curve, name
        self.folder = Path(folder) if folder else None
        self.tokenizer = any_size.tokenizer
        self.full = any_size.original_size()
        self._sizes: OrderedDict = OrderedDict()  # rounded ratio -> Size
        self._models: OrderedDict = OrderedDict()  # (prefix, format) -> nn.Module
        self._windows: dict = {}
        self._cache_size = cache_size
        self._lock = threading.RLock()
        self.tuned = None  # a tuned size's Explorer: dict(size_ratio, format) of the size it was tuned at
        self.parent_folder = self.folder  # the artifact whose tuned sizes are shown on the curve

    @classmethod
    def open(cls, folder: str | Path, on_progress=None, cache_size: int = 4) -> "Explorer":
        """Loads an artifact folder (base model, cached or rebuilt basis) into an Explorer; a tuned
        size's folder (tuned.py) too: every size can be materialized with its tuned LoRA, but it was
        trained and measured at its own size only; the curve shown is its parent's."""
        opened = open_folder(folder, on_progress)
        if opened.tuned is None:
            return cls(opened.any_size, opened.artifact.curve, Path(folder).name, folder, cache_size)
        tuned, size, parent = opened.tuned.meta, opened.size, Path(opened.artifact.path)
        ex = cls(opened.any_size, opened.artifact.curve, tuned_label(parent.name, dict(
            size_ratio=size.size_ratio, format=tuned.format, objective=tuned.finetune.get("objective"),
            steps=tuned.finetune.get("steps"))), folder, cache_size)
        ex.tuned = dict(size_ratio=size.size_ratio, target=tuned.target, format=tuned.format)
        ex.parent_folder = parent
        return ex

    # -- sizes --------------------------------------------------------------------------------
    def size(self, ratio) -> Size:
        key = round(check_ratio(ratio), 6)
        with self._lock:
            if key not in self._sizes:
                self._sizes[key] = self.any_size.size_for_ratio(key)
                if len(self._sizes) > 256:
                    self._sizes.popitem(last=False)
            self._sizes.move_to_end(key)
            return self._sizes[key]

    def gb_by_format(self, size: Size) -> dict:
        """GB of this size in every offered format."""
        return {key: self.any_size.size_at(size.prefix, key).gigabytes for key in FORMAT_CHOICES}

    def _summary(self, size: Size, format: str = "float32") -> dict:
        total_rank = sum(self.any_size.shapes[n].full_rank for n in size.ranks)
        sized = self.any_size.size_at(size.prefix, check_format(format))
        return dict(size_ratio=size.size_ratio, params=sized.params, original_params=self.full.params,
                    params_fraction=sized.params / self.full.params, format=sized.format.key,
                    gb=sized.gigabytes, gb_by_format=self.gb_by_format(size),
                    dense_layers=sized.dense_layers, low_rank_layers=len(size.ranks) - sized.dense_layers,
                    layers=len(size.ranks), kept_rank_fraction=sum(size.ranks.values()) / total_rank)

    def size_for(self, ratio, format: str = "float32") -> dict:
        """Summary of the size for a ratio in a format: size_ratio, params, GB (this format's and every
        format's), dense layers, ..."""
        target = check_ratio(ratio)
        return dict(self._summary(self.size(target), format), target=target)

    def size_for_budget(self, gigabytes, format: str = "float32") -> dict:
        """The largest size whose weights fit in `gigabytes` (1e9 bytes) in `format`, and what is left."""
        budget = check_budget(gigabytes)
        format = check_format(format)
        return self._budget_row(self.any_size.size_for_budget(budget, format), format, budget)

    def _budget_row(self, size, format: str, budget: float) -> dict:
        summary = self._summary(size, format)
        return dict(summary, budget_gb=budget, format=format, budget_left_gb=budget - summary["gb"])

    def smallest_gb(self, format: str = "float32") -> float:
        return self.any_size.size_at(0, check_format(format)).gigabytes

    # -- models -------------------------------------------------------------------------------
    def model(self, ratio, format: str = "float32"):
        """The materialized model at a size in a format (cached; shared by every caller of that size)."""
        format = check_format(format)
        size = self.size(ratio)
        key = (size.prefix, format)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
        # outside the lock: a first size of a format builds its family (int4: about a minute), which must
        # not stall every other visitor's size() and budget rows meanwhile
        model = GATE.wrap(self.any_size.materialize(size, format))
        with self._lock:
            model = self._models.setdefault(key, model)  # one of two racing builds is kept
            self._models.move_to_end(key)
            while len(self._models) > self._cache_size:
                self._models.popitem(last=False)
            return model

    def format_ready(self, format: str) -> bool:
        """Whether a size in this format materializes at once (else its family is built first)."""
        return self.any_size.has_family(check_format(format))

    def cached_sizes(self) -> list[tuple[int, str]]:
        with self._lock:
            return list(self._models)

    # -- tables -------------------------------------------------------------------------------
    def _layer_cells(self, size: Size):
        """(block, module type, kept rank, full rank, dense) for every target layer; dense as the size's
        format decides it (by its bytes: int4's padded factors run dense at lower ranks than float32)."""
        cells = []
        for n in size.ranks:
            parts = n.split(".")
            at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            cells.append((n, int(parts[at]) if at is not None else 0, parts[-1],
                          ".".join(parts[at + 1:]) if at is not None else parts[-1]))
        # a leaf name twice in one block (GPT-2's attn.c_proj and mlp.c_proj): name types by their path
        clash = len({(b, leaf) for _, b, leaf, _ in cells}) < len(cells)
        for n, block, leaf, path in cells:
            r, shape = size.ranks[n], self.any_size.shapes[n]
            yield (block, path if clash else leaf, r, shape.full_rank,
                   shape.format_bytes(r, self.any_size.lora_rank, size.format)[1])

    def _as_size(self, size, format: str | None = None) -> Size:
        size = size if isinstance(size, Size) else self.size(size)
        return size if format is None else self.any_size.size_at(size.prefix, check_format(format))

    def layer_table(self, size, format: str | None = None) -> pd.DataFrame:
        """Per module type: layers, full rank, mean kept rank (and %), layers dense vs low-rank (in
        `format`, else the size's own format)."""
        cells = pd.DataFrame(list(self._layer_cells(self._as_size(size, format))),
                             columns=["block", "module", "kept", "full", "dense"])
        order = list(dict.fromkeys(cells.module))
        rows = []
        for module in order + ["all"]:
            c = cells if module == "all" else cells[cells.module == module]
            rows.append(dict(module=module, layers=len(c), full_rank=round(c.full.mean(), 1),
                             mean_kept_rank=round(c.kept.mean(), 1),
                             kept_percent=round(100 * c.kept.sum() / c.full.sum(), 1),
                             dense=int(c.dense.sum()), low_rank=int((~c.dense).sum())))
        return pd.DataFrame(rows)

    def rank_heatmap(self, size, format: str | None = None) -> dict:
        """Kept-rank fraction as a matrix [blocks × module types] (+ ranks and dense flags in `format`)."""
        cells = list(self._layer_cells(self._as_size(size, format)))
        blocks = sorted({c[0] for c in cells})
        types = list(dict.fromkeys(c[1] for c in cells))
        shape = (len(blocks), len(types))
        kept, full = np.zeros(shape, dtype=int), np.ones(shape, dtype=int)
        dense = np.zeros(shape, dtype=bool)
        for b, t, r, k, d in cells:
            i, j = blocks.index(b), types.index(t)
            kept[i, j], full[i, j], dense[i, j] = r, k, d
        return dict(blocks=blocks, types=types, fraction=kept / full, kept=kept, full=full, dense=dense)

    # -- what the app says about the artifact -------------------------------------------------
    def describe(self) -> dict:
        """The artifact in a few fields: name, model source and architecture, target layers, basis,
        scoring steps, the size the run stopped at, the smallest size on the curve."""
        meta = self.any_size.meta
        return dict(name=self.name, model=meta and meta.model.source, architecture=meta and meta.model.architecture,
                    target_layers=len(self.any_size.targets),
                    basis=meta and meta.basis.recipe.get("kind"),
                    steps=meta and meta.result.steps, stopped_at=meta and meta.result.size_ratio_reached,
                    imported_from=meta and meta.official and meta.official.source,
                    smallest_measured=smallest_measured(self.curve), tuned=self.tuned)

    def tuned_sizes(self, extra=()) -> list[dict]:
        """The tuned sizes of this artifact (or of a tuned size's parent): tuned.tuned_sizes."""
        if self.parent_folder is None or not (Path(self.parent_folder) / "acip.json").is_file():
            return []
        found = tuned_sizes(self.parent_folder, extra)
        for t in found:  # GB in the format it was tuned in (the GB view's x)
            t["gb"] = self.any_size.size_at(self.any_size.size_for_ratio(t["size_ratio"]).prefix,
                                            t["format"]).gigabytes
        return found

    def budget_answer(self, gigabytes) -> dict:
        """The budget's answer in every format the app offers, by the one ranking (curve.rank_for_budget,
        the CLI's `size --budget-gb` too): rows (one per format: format, fits, the size's summary,
        perplexity, ranked; smallest_gb where it does not fit), the best (best=True in its row; by the
        ranking rule among formats measured on comparable windows; the largest size that fits where
        nothing fitting was measured, with measured=False), eval_set, windows, rule (in words) and
        smallest_measured (size_ratio, format, gb of the smallest measured model)."""
        budget = check_budget(gigabytes)
        ranking = rank_for_budget(self.any_size, self.curve, budget, None, FORMAT_CHOICES)
        rows = []
        for r in ranking["rows"]:
            if not r["fits"]:
                rows.append(dict(format=r["format"], fits=False, smallest_gb=r["smallest_gb"]))
                continue
            rows.append(dict(self._budget_row(r["size"], r["format"], budget), fits=True,
                             perplexity=r["perplexity"], ranked=r["ranked"]))
        fitting = [r for r in rows if r["fits"]]
        measured = ranking["best"] is not None
        if measured:
            best = next(r for r in fitting if r["format"] == ranking["best"]["format"])
        elif fitting:  # nothing fitting was measured: the largest size, said to be unmeasured
            best = max(fitting, key=lambda r: (r["size_ratio"], -FORMAT_CHOICES.index(r["format"])))
        else:
            best = None
        if best is not None:
            best["best"] = True
        return dict(rows=rows, best=best, measured=measured, eval_set=ranking["eval_set"],
                    windows=ranking["windows"], rule=rule_text(ranking),
                    smallest_measured=ranking["smallest_measured"])

    def fit_budget_every_format(self, gigabytes) -> list[dict]:
        """The rows of `budget_answer` (one per format; the best has best=True)."""
        return self.budget_answer(gigabytes)["rows"]

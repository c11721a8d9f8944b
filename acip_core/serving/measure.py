"""Measurements for the Explorer: perplexity on evaluation windows, lm-eval tasks, and the results
rows both add (the app keeps them per visitor and writes them as CSV)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pandas as pd
import torch

from acip_core.engine.materialize import Size
from acip_core.evaluation.curve import comparable_value, spread
from acip_core.evaluation.evaluate import perplexity
from acip_core.evaluation.lmeval import run_lm_eval
from acip_core.serving.checks import check_format, check_int
from acip_core.serving.gate import GATE
from acip_core.serving.public import check_data, limits
from acip_core.sources.data import load_text, token_windows
from acip_core.sources.models import check_context


WINDOW_CACHE = 4  # token windows kept per artifact: (text, seq_len) pairs, least recently used dropped


class MeasureMixin:
    """Perplexity, lm-eval and results rows for the Explorer (serving/explorer.py), which provides
    `any_size`, `tokenizer`, `curve`, `name`, `size(ratio)`, `model(ratio, format)`, and the `_lock`
    that guards its `_windows` cache."""

    def _eval_windows(self, data: str, seq_len: int) -> torch.Tensor:
        """The token windows of `data` at `seq_len`; the last WINDOW_CACHE of them kept (each holds a
        whole text's tokens: visitors name texts and lengths, so the cache is bounded)."""
        key = (data, seq_len)
        with self._lock:
            cached = self._windows.pop(key, None)
        if cached is None:  # a visitor names only offered texts and their own uploads (public.py)
            cached = token_windows(self.tokenizer, load_text(check_data(data)), seq_len)
        with self._lock:
            self._windows[key] = cached  # the most recent last
            while len(self._windows) > WINDOW_CACHE:
                self._windows.pop(next(iter(self._windows)))
        return cached

    def _row(self, kind: str, size: Size, format: str, **values) -> dict:
        """One results row. Rows belong to the caller (the app keeps them per session)."""
        row = dict(time=datetime.datetime.now().isoformat(sep=" ", timespec="seconds"), kind=kind,
                   size_ratio=round(size.size_ratio, 5), format=format)
        row.update(values)  # what was measured comes before the size's bookkeeping
        sized = self.any_size.size_at(size.prefix, check_format(format))
        row.update(params=sized.params, gb=sized.gigabytes, artifact=self.name)
        return row

    def measure_perplexity(self, ratio, data: str = "corpus:heldout", windows: int = 8, seq_len: int = 256,
                           format: str = "float32", batch_size: int = 4, on_progress=None,
                           should_stop=None) -> dict:
        """Perplexity of one size on `windows` non-overlapping windows of `data`; adds a results row.

        Raises Cancelled when should_stop() turns True.
        """
        windows = check_int(windows, 1, limits().perplexity_windows, "windows")
        seq_len = check_int(seq_len, 8, 8192, "seq_len")
        format = check_format(format)  # every input checked before any work (a refusal costs no quota)
        size = self.size(ratio)
        check_context(self.any_size.base.config, seq_len)
        check_data(data)
        model = self.model(ratio, format)
        picked = self._eval_windows(data, seq_len)[:windows]
        result = perplexity(model, picked, batch_size, on_progress, should_stop)
        low, high = spread(result["perplexity"], result["nll_std"], result["windows"])
        metric = f"ppl_{data.removeprefix('corpus:')}"  # the curve's column of the same text, if any
        return self._row("perplexity", size, format, data=data, windows=result["windows"],
                         seq_len=seq_len, tokens=result["tokens"], perplexity=result["perplexity"],
                         ppl_low=low, ppl_high=high, nll_std=result["nll_std"],
                         curve_perplexity=comparable_value(self.curve, size.size_ratio, metric, format, seq_len),
                         seconds=round(result["seconds"], 2), tokens_per_s=round(result["tokens_per_s"], 1))

    def measure_lm_eval(self, ratio, tasks, limit=None, batch_size: int = 8, format: str = "float32",
                        should_stop=None, on_progress=None) -> dict:
        """lm-eval tasks on one size (acip_core.evaluation.lmeval); adds a results row with every metric."""
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",")]
        tasks = [t for t in (tasks or []) if t]
        if not tasks:
            raise ValueError("choose at least one lm-eval task")
        lim = limits()  # the heavy slot is shared: bounded work in public mode (public.py)
        if limit is not None or lim.public:
            limit = check_int(lim.lm_eval_items if limit is None else limit, 1, lim.lm_eval_items, "limit")
        batch_size = check_int(batch_size, 1, lim.lm_eval_batch, "batch size")
        format = check_format(format)  # before anything is built (a family of another key would stay)
        size = self.size(ratio)
        model = GATE.wrap(self.any_size.materialize(size, format))  # its own tree: lm-eval's hooks stay on it
        start = time.perf_counter()
        result = run_lm_eval(model, self.tokenizer, tasks, limit, batch_size, should_stop, on_progress)
        seconds = time.perf_counter() - start
        metrics = _flatten_metrics(result)
        return self._row("lm-eval", size, format, data=",".join(tasks), limit=limit,
                         seconds=round(seconds, 2), **metrics)

    @staticmethod
    def results_csv(rows, path: str | Path) -> Path:
        """Writes results rows as CSV: counts as integers, times with their date."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(list(rows))
        for column in ("windows", "seq_len", "tokens", "params", "limit"):
            if column in frame:
                frame[column] = frame[column].astype("Int64")
        frame.to_csv(path, index=False)
        return path


def _flatten_metrics(result) -> dict:
    """{task: {metric: value}} (or lm-eval's {"results": ...}) -> {"task/metric": float}."""
    if isinstance(result, dict) and isinstance(result.get("results"), dict):
        result = result["results"]
    flat = {}
    for task, metrics in (result or {}).items():
        if isinstance(metrics, dict):
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
                    flat[f"{task}/{metric.split(',')[0]}"] = float(value)
        elif isinstance(metrics, (int, float)):
            flat[str(task)] = float(metrics)
    return flat

"""The compression–performance curve: perplexity of every method at every size, as a DataFrame."""

from __future__ import annotations

import logging

import pandas as pd
import torch

from .evaluate import perplexity
from .materialize import AnySizeModel, Size
from .prune import DTYPE_BYTES

log = logging.getLogger(__name__)

DEFAULT_SIZES = [round(0.30 + 0.05 * i, 2) for i in range(15)]  # 0.30 .. 1.00


def size_row(method: str, target: float | None, size: Size) -> dict:
    row = dict(method=method, target=target, size_ratio=round(size.size_ratio, 5), params=size.params,
               dense_layers=size.dense_layers)
    row.update({f"gb_{d}": size.params * b / 1e9 for d, b in DTYPE_BYTES.items() if d != "float16"})
    return row


def original_row(model: AnySizeModel, evals: dict[str, torch.Tensor], batch_size=4) -> dict:
    row = size_row("original", 1.0, model.full_size())
    for name, windows in evals.items():
        row[f"ppl_{name}"] = perplexity(model.base, windows, batch_size)["perplexity"]
    return row


def acip_curve(model: AnySizeModel, evals: dict[str, torch.Tensor], sizes=DEFAULT_SIZES,
               batch_size: int = 4, on_progress=None, method: str = "acip") -> pd.DataFrame:
    """Rows for the original and for each size (perplexity on every eval set)."""
    rows = [original_row(model, evals, batch_size)] if evals else [size_row("original", 1.0, model.full_size())]
    for i, target in enumerate(sizes):
        size = model.size_for_ratio(target)
        row = size_row(method, target, size)
        if evals:
            net = model.materialize(size)
            for name, windows in evals.items():
                row[f"ppl_{name}"] = perplexity(net, windows, batch_size)["perplexity"]
            del net
        rows.append(row)
        log.info("%s %.2f: %s", method, target, {k: v for k, v in row.items() if k.startswith("ppl")})
        if on_progress:
            on_progress(i + 1, len(sizes))
    return pd.DataFrame(rows)


def method_curve(folder, method: str, evals: dict[str, torch.Tensor], sizes=DEFAULT_SIZES, dtype="bfloat16",
                 batch_size: int = 4, calib_windows: torch.Tensor | None = None, on_progress=None) -> pd.DataFrame:
    """Rows of one method at every size (block removal: at each of its own discrete sizes)."""
    from .artifact import save_artifact
    from .baselines import block_removal_order, block_removal_sizes
    from .pipeline import open_method

    any_size, artifact = open_method(folder, method)
    if method == "block-removal":
        order = artifact.meta.get("baselines", {}).get("block_removal_order")
        if order is None:
            order = block_removal_order(any_size, calib_windows, on_progress)
            artifact.meta.setdefault("baselines", {})["block_removal_order"] = order
            save_artifact(folder, artifact)
        points = [(None, s) for s in block_removal_sizes(any_size, order) if s.size_ratio >= min(sizes) - 1e-9]
    else:
        points = [(t, any_size.size_for_ratio(t)) for t in sizes]
    rows = []
    for i, (target, size) in enumerate(points):
        row = size_row(method, target, size)
        net = any_size.materialize(size, dtype)
        for name, windows in evals.items():
            result = perplexity(net, windows, batch_size)
            row[f"ppl_{name}"], row[f"nll_std_{name}"] = result["perplexity"], result["nll_std"]
        del net
        rows.append(row)
        log.info("%s %.3f: %s", method, size.size_ratio, {k: round(v, 3) for k, v in row.items() if k.startswith("ppl")})
        if on_progress:
            on_progress(i + 1, len(points))
    if method == "acip":  # the reference line, measured the same way
        row = size_row("original", 1.0, any_size.full_size())
        for name, windows in evals.items():
            result = perplexity(any_size.materialize(any_size.full_size(), dtype), windows, batch_size)
            row[f"ppl_{name}"], row[f"nll_std_{name}"] = result["perplexity"], result["nll_std"]
        rows.insert(0, row)
    return pd.DataFrame(rows)

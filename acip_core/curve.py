"""The compression–performance curve: perplexity of every method at every size, as a DataFrame."""

from __future__ import annotations

import logging
import math

import numpy as np
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


# -- reading a curve (what the app shows next to a size) --------------------------------------------
EVAL_SETS = {  # the eval sets of curve.csv (ppl_<name>), in words; see acip_core/data.py
    "heldout": "held-out handbook text",  # the last 20 % of the Debian handbook, never calibrated on
    "domain": "Python help topics (a domain never seen in calibration)",
}


def eval_set_label(column: str) -> str:
    """`ppl_heldout` -> its description in words (the bare name for an eval set without one)."""
    name = column.removeprefix("ppl_")
    return EVAL_SETS.get(name, name)


def ppl_columns(curve: pd.DataFrame | None) -> list[str]:
    """The curve's perplexity columns (ppl_<evalset>), in file order."""
    return [c for c in (curve.columns if curve is not None else []) if c.startswith("ppl_")]


def interp_log(xs, ys, x0) -> float | None:
    """log-linear interpolation of (xs, ys) at x0; None outside the range of xs."""
    pts = sorted((float(a), float(b)) for a, b in zip(xs, ys) if b > 0 and np.isfinite(b))
    if len(pts) < 2 or not pts[0][0] <= x0 <= pts[-1][0]:
        return None
    xa, ya = zip(*pts)
    return float(math.exp(np.interp(x0, xa, np.log(ya))))


def first_method(curve: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of the curve's first compressed method (the artifact's own: ACIP) that have `metric`."""
    rows = curve[(curve.method != "original") & curve[metric].notna()]
    return rows[rows.method == rows.method.iloc[0]] if len(rows) else rows


def curve_at(curve: pd.DataFrame | None, size_ratio: float, metric: str | None = None) -> dict:
    """What the curve says at a size: dict(metric, value (interpolated; None outside the measured
    sizes), original, span (smallest, largest measured size) or None)."""
    cols = ppl_columns(curve)
    metric = metric if metric in cols else (cols[0] if cols else None)
    if metric is None:
        return dict(metric=None, value=None, original=None, span=None)
    acip = first_method(curve, metric)
    ref = curve[curve.method == "original"][metric].dropna()
    span = (float(acip.size_ratio.min()), float(acip.size_ratio.max())) if len(acip) else None
    return dict(metric=metric, value=interp_log(acip.size_ratio, acip[metric], size_ratio),
                original=float(ref.iloc[0]) if len(ref) else None, span=span)


def suggested_ratio(curve: pd.DataFrame | None, within: float = 1.25) -> float:
    """A first size worth looking at: the smallest curve size within `within`× the original's
    perplexity (1.0 without a curve)."""
    cols = ppl_columns(curve)
    if not cols:
        return 1.0
    m = cols[0]
    ref = curve[curve.method == "original"][m].dropna()
    if not len(ref):
        return 1.0
    good = curve[(curve.method != "original") & (curve[m] <= within * float(ref.iloc[0]))]
    return float(good.size_ratio.min()) if len(good) else 1.0


def smallest_measured(curve: pd.DataFrame | None) -> float | None:
    """The smallest size the artifact's own method was measured at (None without a curve)."""
    cols = ppl_columns(curve)
    if not cols:
        return None
    rows = first_method(curve, cols[0])
    return float(rows.size_ratio.min()) if len(rows) else None


def spread(perplexity: float, nll_std: float, windows: int) -> tuple[float, float]:
    """(low, high): perplexity at the mean window NLL ± one standard error (nll_std / √windows)."""
    se = nll_std / math.sqrt(max(int(windows), 1))
    return perplexity * math.exp(-se), perplexity * math.exp(se)

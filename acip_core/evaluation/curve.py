"""The compression–performance curve: perplexity of every method at every size and format, as a DataFrame.

One row per (method, format, size): `format` is a formats.Format key, `gb` the bytes of that size
in that format (1e9), what the GB view and the budget picker read.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch

from acip_core.evaluation.evaluate import perplexity
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.system.units import format_gb

log = logging.getLogger(__name__)

DEFAULT_SIZES = [round(0.30 + 0.05 * i, 2) for i in range(15)]  # 0.30 .. 1.00


def size_row(method: str, target: float | None, size: Size) -> dict:
    return dict(method=method, format=size.format.key, target=target, size_ratio=round(size.size_ratio, 5),
                params=size.params, dense_layers=size.dense_layers, gb=size.gigabytes)


def original_row(model: AnySizeModel, evals: dict[str, torch.Tensor], batch_size=4) -> dict:
    row = size_row("original", 1.0, model.original_size())
    for name, windows in evals.items():
        row[f"ppl_{name}"] = perplexity(model.base, windows, batch_size)["perplexity"]
    return row


def acip_curve(model: AnySizeModel, evals: dict[str, torch.Tensor], sizes=DEFAULT_SIZES,
               batch_size: int = 4, on_progress=None, method: str = "acip") -> pd.DataFrame:
    """Rows for the original and for each size (perplexity on every eval set)."""
    rows = [original_row(model, evals, batch_size)] if evals else [size_row("original", 1.0, model.original_size())]
    # the window length, which comparable_value matches a measurement against
    shape = {"seq_len": max(w.shape[-1] for w in evals.values())} if evals else {}
    rows[0].update(shape)
    for i, target in enumerate(sizes):
        size = model.size_for_ratio(target)
        row = dict(size_row(method, target, size), **shape)
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


# -- reading a curve (what the app shows next to a size) --------------------------------------------
EVAL_SETS = {  # the eval sets of curve.csv (ppl_<name>), in words; see acip_core/sources/data.py
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


def first_method(curve: pd.DataFrame, metric: str, format: str | None = None) -> pd.DataFrame:
    """Rows of the artifact's own method (ACIP; a curve without ACIP rows: its first compressed method)
    that have `metric`, in format `format` when it was measured in it (else in its first measured
    format). By name, not by place: `curve --methods` appends re-measured methods after the kept rows."""
    curve = curve_frame(curve)
    rows = curve[(curve.method != "original") & curve[metric].notna()]
    own = "acip" if (rows.method == "acip").any() else (rows.method.iloc[0] if len(rows) else None)
    rows = rows[rows.method == own]
    if len(rows):
        rows = rows[rows.format == (format if format in set(rows.format) else rows.format.iloc[0])]
    return rows


def curve_at(curve: pd.DataFrame | None, size_ratio: float, metric: str | None = None,
             format: str | None = None) -> dict:
    """What the curve says at a size (in a format): dict(metric, value (interpolated; None outside the
    measured sizes), original, span (smallest, largest measured size) or None)."""
    cols = ppl_columns(curve)
    metric = metric if metric in cols else (cols[0] if cols else None)
    if metric is None:
        return dict(metric=None, value=None, original=None, span=None)
    curve = curve_frame(curve)
    acip = first_method(curve, metric, format)
    originals = curve[(curve.method == "original") & curve[metric].notna()]
    ref = originals[originals.format == format][metric] if format in set(originals.format) else originals[metric]
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
    rows = first_method(curve, m)
    good = rows[rows[m] <= within * float(ref.iloc[0])]
    return float(good.size_ratio.min()) if len(good) else 1.0


def smallest_measured(curve: pd.DataFrame | None) -> float | None:
    """The smallest size the artifact's own method was measured at (None without a curve)."""
    cols = ppl_columns(curve)
    if not cols:
        return None
    rows = first_method(curve, cols[0])
    return float(rows.size_ratio.min()) if len(rows) else None


CURVE_SEQ_LEN = 256  # the window length of curves that do not record theirs (every curve before seq_len)


def comparable_value(curve: pd.DataFrame | None, size_ratio: float, metric: str, format: str,
                     seq_len: int) -> float | None:
    """What the curve says at a size for a measurement to be set beside it: the artifact's own line
    measured in `format` on `metric` at `seq_len` tokens a window (rows without `seq_len` were measured
    at CURVE_SEQ_LEN), interpolated; None where the curve has no such rows (`curve --formats/--seq-len`
    add lines of other formats and lengths beside the kept ones)."""
    if metric not in ppl_columns(curve):
        return None
    line = first_method(curve, metric, format)
    line = line[line.format == format]
    lengths = line.seq_len.fillna(CURVE_SEQ_LEN) if "seq_len" in line else pd.Series(CURVE_SEQ_LEN, index=line.index)
    line = line[lengths == seq_len]
    return interp_log(line.size_ratio, line[metric], size_ratio)


def spread(perplexity: float, nll_std: float, windows: int) -> tuple[float, float]:
    """(low, high): perplexity at the mean window NLL ± one standard error (nll_std / √windows)."""
    se = nll_std / math.sqrt(max(int(windows), 1))
    return perplexity * math.exp(-se), perplexity * math.exp(se)


# -- analytics over a measured curve ----------------------------------------------------------------
def curve_frame(curve: pd.DataFrame | None) -> pd.DataFrame | None:
    """The curve with `format` and `gb` columns (curves written before formats existed were measured by
    the curve command in bfloat16: their rows are read as bfloat16, gb from gb_bfloat16)."""
    if curve is None or "format" in curve:
        return curve
    curve = curve.copy()
    curve.insert(1, "format", "bfloat16")
    curve["gb"] = curve["gb_bfloat16"] if "gb_bfloat16" in curve else \
        curve["params"] * 2 / 1e9 if "params" in curve else float("nan")
    return curve.drop(columns=[c for c in ("gb_float32", "gb_bfloat16") if c in curve])


def interpolate_ppl(rows: pd.DataFrame, size_ratio: float, eval_set: str = "heldout") -> float | None:
    """Perplexity at `size_ratio` from one (method, format) line: linear in log perplexity between the
    two measured neighbours; None outside the measured range."""
    col = f"ppl_{eval_set}"
    if col not in rows:
        return None
    pts = rows[["size_ratio", col]].dropna()
    if not len(pts) or not pts.size_ratio.min() - 1e-6 <= size_ratio <= pts.size_ratio.max() + 1e-6:
        return None
    if len(pts) == 1:  # one measured size: its own value (interp_log needs two)
        return float(pts[col].iloc[0])
    at = min(max(size_ratio, pts.size_ratio.min()), pts.size_ratio.max())  # within the 1e-6 tolerance
    return interp_log(pts.size_ratio, pts[col], at)


def acip_rows(curve: pd.DataFrame | None) -> pd.DataFrame | None:
    """The curve's ACIP rows (every format), or None when it has none."""
    curve = curve_frame(curve)
    if curve is None or "format" not in curve or not (curve.method == "acip").any():
        return None
    return curve[curve.method == "acip"]


def comparable_acip(curve: pd.DataFrame | None) -> pd.DataFrame | None:
    """The curve's ACIP rows whose perplexities can be ranked against each other: those of the formats
    measured on the window count most formats share (curve_formats.sh: 16; older bf16 rows: 32)."""
    acip = acip_rows(curve)
    if acip is None:
        return None
    if "windows" in acip and acip.windows.notna().any():
        per_format = acip.groupby("format").windows.max()
        acip = acip[acip.format.isin(per_format[per_format == per_format.mode().iloc[0]].index)]
    return acip


def noise_at(rows: pd.DataFrame, size_ratio: float, eval_set: str = "heldout") -> float | None:
    """One standard error of log perplexity at `size_ratio` on one (method, format) line: the spread
    Measure and curve.csv record (nll_std_<set> over `windows` windows: nll_std / √windows, as
    `spread`), interpolated between measured sizes; None where the curve records no spread."""
    col = f"nll_std_{eval_set}"
    if col not in rows or "windows" not in rows:
        return None
    pts = rows[["size_ratio", col, "windows"]].dropna().sort_values("size_ratio")
    if not len(pts):
        return None
    se = pts[col] / np.sqrt(pts.windows.clip(lower=1))
    return float(np.interp(size_ratio, pts.size_ratio, se))


def _candidates(any_size: AnySizeModel, line: pd.DataFrame | None, budget_gb: float, key: str,
                eval_set: str) -> tuple[Size, list[dict]]:
    """The largest size of format `key` within the budget (ValueError when even the smallest does not
    fit) and every size the ranking may pick in it: that one and each measured size below it (a curve
    need not be monotone), each with its perplexity (interpolated on the curve) and its noise."""
    largest = any_size.size_for_budget(budget_gb, key)
    if line is None or not len(line):
        return largest, []
    sizes = [largest] + [any_size.size_for_ratio(r, key) for r in line.size_ratio if r < largest.size_ratio - 1e-9]
    found = []
    for size in sizes:
        ppl = interpolate_ppl(line, size.size_ratio, eval_set)
        if ppl is not None and size.gigabytes <= budget_gb:
            found.append(dict(size=size, format=key, size_ratio=round(size.size_ratio, 5), gb=size.gigabytes,
                              perplexity=ppl, noise=noise_at(line, size.size_ratio, eval_set)))
    return largest, found


def _pick(candidates: list[dict]) -> dict | None:
    """THE ranking rule (README "Precision", "the budget's answer"): the lowest perplexity wins unless
    a larger size (or, at the same size, a format with more bytes: closer to the original) is within
    noise of it, in which case the largest such wins. Within noise: the two log perplexities differ by
    at most one standard error of their difference, √(se_a² + se_b²) (0 where no spread is recorded).
    So a user with room for the original gets the original unless a smaller model is better beyond
    noise."""
    if not candidates:
        return None
    best = min(candidates, key=lambda c: c["perplexity"])

    def tied(c):
        se = math.hypot(c["noise"] or 0.0, best["noise"] or 0.0)
        return math.log(c["perplexity"]) - math.log(best["perplexity"]) <= se

    return max((c for c in candidates if tied(c)), key=lambda c: (round(c["size_ratio"], 4), c["gb"]))


def best_in_format(any_size: AnySizeModel, acip: pd.DataFrame | None, budget_gb: float, key: str,
                   eval_set: str = "heldout") -> dict:
    """The budget's answer in one format by the ranking rule (`_pick`): dict(size, format, size_ratio,
    gb, perplexity, noise); perplexity None where the curve has no value for this format's fitting
    sizes (then the largest size that fits). Raises ValueError when even the smallest size does not fit."""
    line = acip[acip.format == key] if acip is not None else None
    largest, found = _candidates(any_size, line, budget_gb, key, eval_set)
    pick = _pick(found)
    return pick or dict(size=largest, format=key, size_ratio=round(largest.size_ratio, 5), gb=largest.gigabytes,
                        perplexity=None, noise=None)


def rank_for_budget(any_size: AnySizeModel, curve: pd.DataFrame | None, budget_gb: float,
                    eval_set: str | None = None, formats=None) -> dict:
    """The one budget ranking (the CLI's `size --budget-gb` and the app's budget answer): for every
    format of `formats` (default: the curve's), its answer (`best_in_format`) or that it does not fit,
    and the best of all by the ranking rule (`_pick`) over every fitting measured size of every format
    measured on comparable windows (`comparable_acip`). Returns dict(rows: one per format (format,
    fits, smallest_gb or the pick, ranked), best: the winning row or None when nothing fitting was
    measured, eval_set, windows: the window count that decided, smallest_measured: the smallest
    measured size of any ranked format (size_ratio, format, gb) for "what is needed")."""
    cols = ppl_columns(curve)
    eval_set = eval_set or (cols[0][len("ppl_"):] if cols else "heldout")
    acip = acip_rows(curve)
    comparable = comparable_acip(curve)
    ranked_formats = set(comparable.format) if comparable is not None else set()
    keys = list(formats) if formats is not None else list(dict.fromkeys(acip.format)) if acip is not None else []
    rows, pool = [], []
    for key in keys:
        try:
            line = acip[acip.format == key] if acip is not None else None
            largest, found = _candidates(any_size, line, budget_gb, key, eval_set)
        except ValueError:
            rows.append(dict(format=key, fits=False, smallest_gb=any_size.size_at(0, key).gigabytes))
            continue
        pick = _pick(found) or dict(size=largest, format=key, size_ratio=round(largest.size_ratio, 5),
                                    gb=largest.gigabytes, perplexity=None, noise=None)
        ranked = key in ranked_formats and pick["perplexity"] is not None
        rows.append(dict(pick, fits=True, ranked=ranked))
        if key in ranked_formats:
            pool += found
    winner = _pick(pool)
    best = next((r for r in rows if winner is not None and r["fits"] and r["format"] == winner["format"]), None)
    if best is not None and best["size_ratio"] != winner["size_ratio"]:  # the format's own pick differs
        best.update(winner)
    smallest = None  # what the smallest measured model needs (GB in its own format, as sized here)
    col = f"ppl_{eval_set}"
    for key in (k for k in keys if k in ranked_formats):
        line = comparable[(comparable.format == key)]
        line = line[line[col].notna()] if col in line else line.iloc[0:0]
        if len(line):
            size = any_size.size_for_ratio(float(line.size_ratio.min()), key)
            if smallest is None or size.gigabytes < smallest["gb"]:
                smallest = dict(size_ratio=round(size.size_ratio, 5), format=key, gb=size.gigabytes)
    windows = int(comparable.windows.max()) if comparable is not None and "windows" in comparable \
        and comparable.windows.notna().any() else None
    return dict(rows=rows, best=best, eval_set=eval_set, windows=windows, smallest_measured=smallest)


def best_for_budget(any_size: AnySizeModel, curve: pd.DataFrame | None, budget_gb: float,
                    eval_set: str = "heldout", formats=None) -> dict:
    """The best (size, format) under `budget_gb` by the measured curve: `rank_for_budget` (the app's
    budget answer is the same ranking). Returns the pick (`size`, `format`, `size_ratio`, `gb`,
    `perplexity`, `noise`), `runners_up` (the next two ranked formats, by perplexity), `eval_set` and
    `rule` (how it was decided)."""
    acip = comparable_acip(curve)
    if acip is None:
        raise ValueError("this artifact has no measured curve to rank formats by: pass --format, or "
                         "measure one with python -m acip_core curve --formats ...")
    measured = [c[len("ppl_"):] for c in ppl_columns(curve)]
    if eval_set not in measured:
        raise ValueError(f"the curve measured no perplexity on {eval_set!r}; it has {', '.join(measured) or 'none'}")
    keys = [k for k in (formats or dict.fromkeys(acip.format)) if k in set(acip.format)]
    ranking = rank_for_budget(any_size, curve, budget_gb, eval_set, keys)
    fitting = [r for r in ranking["rows"] if r["fits"]]
    if ranking["best"] is None:
        smallest = min((any_size.size_at(0, k).gigabytes, k) for k in keys)
        if not fitting:
            raise ValueError(f"{budget_gb:g} GB is smaller than the smallest model "
                             f"({format_gb(smallest[0])} in {smallest[1]})")
        raise ValueError(f"{budget_gb:g} GB holds no measured size in any format (measured sizes start "
                         f"at {acip.size_ratio.min():.2f}; pass --format for an unmeasured size)")
    best = {k: v for k, v in ranking["best"].items() if k not in ("fits", "ranked")}
    others = sorted((r for r in fitting if r["ranked"] and r is not ranking["best"]), key=lambda r: r["perplexity"])
    best["runners_up"] = [{k: v for k, v in r.items() if k not in ("size", "fits", "ranked")} for r in others[:2]]
    best["eval_set"] = eval_set
    best["rule"] = rule_text(ranking)
    return best


def rule_text(ranking: dict) -> str:
    """How `rank_for_budget`'s answer was decided, in words (the CLI prints it, the app shows it)."""
    where = f"perplexity on {eval_set_label('ppl_' + ranking['eval_set'])}"
    if ranking.get("windows"):
        where += f" ({ranking['windows']} windows)"
    return (f"decided by {where}: the lowest wins unless a larger size is within noise of it (one standard "
            "error of the difference), then the largest such")


def pareto_frontier(curve: pd.DataFrame, eval_set: str = "heldout", methods=("acip", "original")) -> pd.DataFrame:
    """The rows no other row beats: each has the lowest perplexity of every row at or below its GB."""
    curve = curve_frame(curve)
    col = f"ppl_{eval_set}"
    rows = curve[curve.method.isin(methods)].dropna(subset=[col]).sort_values(["gb", col])
    keep, best = [], math.inf
    for i, row in rows.iterrows():
        if row[col] < best:
            keep.append(i)
            best = row[col]
    return rows.loc[keep]

"""Plotly figures for the app: the trade-off curve, the kept-rank heatmap, a scoring run's progress."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from acip_core.evaluation.curve import curve_frame, eval_set_label, interp_log, pareto_frontier, ppl_columns  # noqa: F401  (ppl_columns: re-exported)
from acip_core.formats.registry import parse_format

COLORS = {"acip": "#4f46e5", "original": "#6b7280", "measured": "#f97316", "current": "#dc2626",
          "tuned": "#059669"}
_PALETTE = ["#0891b2", "#16a34a", "#ca8a04", "#9333ea", "#db2777", "#475569"]
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50),
               legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0))


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#6b7280"))
    fig.update_layout(**_LAYOUT, xaxis=dict(visible=False), yaxis=dict(visible=False), height=420)
    return fig


def _x_of(frame: pd.DataFrame, x: str, format: str = "") -> pd.Series:
    """The x values of curve or results rows: size ratio, or GB in each row's own format."""
    if x == "size_ratio":
        return frame["size_ratio"]
    if "gb" in frame:
        return frame["gb"]
    column = f"gb_{format}"
    return frame[column] if column in frame else frame["params"] * 4 / 1e9


def _format_style(key: str) -> tuple[dict, dict]:
    """(line, marker) of ACIP in one format: ACIP's one colour; the format family told apart by its dash
    and marker symbol (formats/registry.py: each family's own), +emb8 by a thinner line, +fast by an open
    marker."""
    format = parse_format(key)
    line = dict(color=COLORS["acip"], width=1.5 if format.embeddings == "int8" else 2.5, dash=format.dash)
    return line, dict(symbol=format.marker + ("-open" if format.layout == "fast" else ""))


def method_colors(methods) -> dict:
    """One colour per method: ACIP and the original their own, every other method the next colour of
    a palette that holds neither (so no baseline ever looks like ACIP in some format)."""
    others = [m for m in dict.fromkeys(methods) if m not in COLORS]
    return {**{m: COLORS[m] for m in dict.fromkeys(methods) if m in COLORS},
            **{m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(others)}}


def curve_figure(curve: pd.DataFrame | None, x: str = "size_ratio", format: str = "float32",
                 metric: str | None = None, current: dict | None = None,
                 measured: pd.DataFrame | None = None, title: str = "", tuned: list | None = None) -> go.Figure:
    """Perplexity (log y) vs size ratio or GB.

    Size-ratio view: one line per method in the selected format `format` (a Format key; baselines in the
    float format they were measured in), the original as a reference line. GB view: ACIP in every
    measured format, the original in each format as a star, and the Pareto frontier (the lowest
    perplexity for each budget) as a wide band. The current size is a marker; measurements are points.

    Args:
        curve: rows of curve.csv (method, format, size_ratio, params, gb, ppl_*).
        x: "size_ratio" or "gb".
        format: the selected format key.
        metric: which ppl_<evalset> column (default: the first).
        current: a summary dict (size_ratio, gb) of the selected size in the selected format.
        measured: the results table (kind, size_ratio, gb, data, perplexity).
        tuned: tuned sizes (Explorer.tuned_sizes: size_ratio, gb, format, objective, steps, perplexity
            per eval set, untuned and tuned), drawn as their own markers beside the untuned line.
    """
    curve = curve_frame(curve)
    metric = metric or (ppl_columns(curve)[0] if ppl_columns(curve) else None)
    xlabel = "size ratio (kept fraction of the target layers)" if x == "size_ratio" \
        else "weights in GB (each format's own bytes: data + scales)"
    if curve is None or metric is None or metric not in curve:
        fig = empty_figure("this artifact has no perplexity curve yet; measure sizes in the Measure tab")
        fig.update_layout(xaxis=dict(visible=True, title=xlabel), yaxis=dict(visible=True, type="log",
                                                                             title="perplexity"))
        acip = None
    else:
        fig = go.Figure()
        data = curve[curve[metric].notna()]
        formats = list(dict.fromkeys(data[data.method == "acip"].format))
        shown_format = format if format in formats else (formats[0] if formats else format)
        if x == "size_ratio":  # ACIP in the selected format, baselines in theirs
            lines = [(m, shown_format if m == "acip" else None) for m in dict.fromkeys(data.method) if m != "original"]
        else:
            lines = [("acip", f) for f in formats]
        colors = method_colors(data.method)
        for method, format in lines:
            rows = data[(data.method == method) & ((data.format == format) if format else True)]
            if format is None:  # a baseline: its first measured format
                rows = rows[rows.format == rows.format.iloc[0]] if len(rows) else rows
            rows = rows.sort_values("size_ratio")
            name = method if x == "size_ratio" and method != "acip" else f"{method} {rows.format.iloc[0] if len(rows) else format}"
            style, marker = _format_style(format) if method == "acip" else (dict(color=colors[method], width=2.5),
                                                                          dict(symbol="circle"))
            fig.add_trace(go.Scatter(
                x=_x_of(rows, x), y=rows[metric], mode="lines+markers", name=name, line=style,
                marker=dict(marker, size=6 if x == "gb" else 7),
                customdata=np.stack([rows.size_ratio, _x_of(rows, "gb")], axis=-1),
                hovertemplate=f"{name}<br>size %{{customdata[0]:.3f}}<br>%{{customdata[1]:.4f}} GB"
                              "<br>perplexity %{y:.4g}<extra></extra>"))
        original = data[data.method == "original"]
        ref_rows = original[original.format == shown_format] if len(original) else original
        ref_rows = ref_rows if len(ref_rows) else original
        ref = float(ref_rows[metric].iloc[0]) if len(ref_rows) else None
        if ref is not None and x == "size_ratio":  # a trace, not add_hline (log axis units)
            fig.add_trace(go.Scatter(
                x=[0.0, 1.02], y=[ref, ref], mode="lines",
                name=f"original ({ref:.4g})", line=dict(color=COLORS["original"], dash="dash", width=1.5),
                hovertemplate=f"original model: perplexity {ref:.4g}<extra></extra>"))
        elif len(original):  # GB view: the original in every format, and the frontier
            # (a fast layout's original is its small layout's: every layer dense either way)
            original = original[~original.format.str.endswith("+fast")]
            fig.add_trace(go.Scatter(  # no text labels: at close GB they overlapped (the hover names the format)
                x=original.gb, y=original[metric], mode="markers", name="original (each format)",
                text=original.format, marker=dict(color=COLORS["original"], size=12, symbol="star"),
                hovertemplate="original in %{text}<br>%{x:.4f} GB<br>perplexity %{y:.4g}<extra></extra>"))
            front = pareto_frontier(data, metric[4:])
            if len(front):
                fig.add_trace(go.Scatter(
                    x=front.gb, y=front[metric], mode="lines", name="best for each budget (frontier)",
                    line=dict(color="rgba(220,38,38,0.25)", width=12, shape="hv"),
                    customdata=np.stack([front.format, front.size_ratio], axis=-1),
                    hovertemplate="frontier: %{customdata[0]} at size %{customdata[1]:.2f}<br>%{x:.4f} GB"
                                  "<br>perplexity %{y:.4g}<extra></extra>"))
        fig.update_layout(xaxis_title=xlabel, yaxis=dict(type="log", title="perplexity (log)"))
        title = f"{title} · {eval_set_label(metric)}" if title else eval_set_label(metric)
        acip = data[(data.method == "acip") & (data.format == shown_format)]
        focus = list(data[data.method == "acip"][metric]) + ([ref] if ref is not None else [])
        if measured is not None and len(measured) and "perplexity" in measured:
            focus += list(measured.perplexity.dropna())
        focus = [v for v in focus if v > 0 and math.isfinite(v)]
        if focus:  # frame ACIP and the reference; far-off baselines are clipped (autoscale shows all)
            lo, hi = min(focus) / 1.5, max(max(focus) * 3, min(focus) * 10)
            fig.update_yaxes(range=[math.log10(lo), math.log10(hi)], **log_ticks(lo, hi))
            clipped = [m for m, _ in lines if m != "acip" and (data[data.method == m][metric] > hi).any()]
            if clipped:
                # two short lines: one line was cut at the plot's right edge in a 1024-px window
                fig.add_annotation(text=f"{', '.join(clipped)}:<br>partly above the frame; double-click "
                                        "to show all", x=0.01, y=0.01, xref="paper",
                                   yref="paper", xanchor="left", yanchor="bottom", showarrow=False,
                                   font=dict(size=11, color="#6b7280"), bgcolor="rgba(255,255,255,0.8)")
    if current is not None and acip is not None:
        xc = current["size_ratio"] if x == "size_ratio" else current["gb"]
        fig.add_vline(x=xc, line=dict(color=COLORS["current"], width=1, dash="dot"))
        yc = interp_log(_x_of(acip, x), acip[metric], xc) if len(acip) else None
        if yc is not None:
            fig.add_trace(go.Scatter(
                x=[xc], y=[yc], mode="markers", name="current size",
                marker=dict(color=COLORS["current"], size=14, symbol="diamond", line=dict(color="white", width=1.5)),
                hovertemplate=f"current size {current['size_ratio']:.3f} ({format})<br>"
                              "perplexity ≈ %{y:.4g} (interpolated)<extra></extra>"))
    if measured is not None and len(measured) and "perplexity" in measured:
        points = measured[measured.perplexity.notna()]
        for i, (data_name, rows) in enumerate(points.groupby("data", sort=False)):
            fig.add_trace(go.Scatter(
                x=_x_of(rows, x), y=rows.perplexity, mode="markers", name=f"measured: {data_name}",
                marker=dict(color=COLORS["measured"] if i == 0 else _PALETTE[i % len(_PALETTE)], size=11,
                            symbol="circle-open", line=dict(width=3)),
                error_y=_error_bars(rows),
                customdata=np.stack([rows.size_ratio, rows.windows, rows["format"]], axis=-1),
                hovertemplate="measured at %{customdata[0]:.3f} (%{customdata[2]})<br>"
                              "perplexity %{y:.4g}<br>%{customdata[1]} windows<extra></extra>"))
    _tuned_markers(fig, tuned or [], x, metric)
    # the title above the legend (both on top: a legend at y=1 alone would cover the title)
    fig.update_layout(**_LAYOUT, height=460, title=dict(text=title, x=0.01, y=0.97, yanchor="top",
                                                        font=dict(size=14)))
    fig.update_layout(margin=dict(t=95), legend=dict(y=1.02))
    if x == "size_ratio":
        fig.update_xaxes(range=[-0.02, 1.04])
    return fig


def _tuned_markers(fig: go.Figure, tuned: list[dict], x: str, metric: str | None) -> None:
    """Tuned sizes at their size (or GB in their format): the tuned perplexity, and a thin line down
    from the same size untuned (both measured by finetune on the same windows)."""
    name = (metric or "ppl_heldout")[4:]  # (no curve yet: the held-out figures)
    points = [t for t in tuned if isinstance(t.get("perplexity", {}).get(name), dict)]
    for t in points:
        fig_x = t["size_ratio"] if x == "size_ratio" else t["gb"]
        before, after = t["perplexity"][name]["untuned"]["perplexity"], t["perplexity"][name]["tuned"]["perplexity"]
        fig.add_trace(go.Scatter(x=[fig_x, fig_x], y=[before, after], mode="lines", showlegend=False,
                                 line=dict(color=COLORS["tuned"], width=1.5, dash="dot"), hoverinfo="skip"))
    if points:
        fig.add_trace(go.Scatter(
            x=[t["size_ratio"] if x == "size_ratio" else t["gb"] for t in points],
            y=[t["perplexity"][name]["tuned"]["perplexity"] for t in points], mode="markers", name="tuned sizes",
            marker=dict(color=COLORS["tuned"], size=13, symbol="triangle-down", line=dict(color="white", width=1)),
            customdata=[[t["size_ratio"], t["format"], t["objective"], t["steps"],
                         t["perplexity"][name]["untuned"]["perplexity"]] for t in points],
            hovertemplate="tuned at %{customdata[0]:.3f} in %{customdata[1]} (%{customdata[2]}, %{customdata[3]} "
                          "steps)<br>perplexity %{y:.4g} (untuned %{customdata[4]:.4g})<extra></extra>"))


def log_ticks(lo: float, hi: float) -> dict:
    """Tick values 1-2-5 × 10^k between lo and hi, labelled in full ("200", not plotly's "2")."""
    values = [m * 10 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
              for m in (1, 2, 5) if lo <= m * 10 ** k <= hi]
    return dict(tickvals=values, ticktext=[f"{v:,g}" for v in values]) if len(values) >= 2 else {}


def _error_bars(rows: pd.DataFrame) -> dict | None:
    """± one standard error of the mean window NLL (curve.spread), when the rows carry it."""
    if not {"ppl_low", "ppl_high"} <= set(rows.columns):
        return None
    return dict(type="data", symmetric=False, array=(rows.ppl_high - rows.perplexity).tolist(),
                arrayminus=(rows.perplexity - rows.ppl_low).tolist(), thickness=1.5, width=4)


def heatmap_figure(heat: dict, title: str = "") -> go.Figure:
    """Kept-rank fraction per block (rows) and module type (columns); dense layers are marked."""
    types = [t.removesuffix("_proj") for t in heat["types"]]
    hover = np.empty(heat["fraction"].shape, dtype=object)
    for (i, j), f in np.ndenumerate(heat["fraction"]):
        state = "dense (original weight)" if heat["dense"][i, j] else "low-rank"
        hover[i, j] = f"rank {heat['kept'][i, j]} / {heat['full'][i, j]} ({100 * f:.0f} %), {state}"
    text = np.where(heat["dense"], "D", "")
    fig = go.Figure(go.Heatmap(
        z=heat["fraction"], x=types, y=[str(b) for b in heat["blocks"]], zmin=0, zmax=1,
        colorscale="Viridis", customdata=hover, text=text, texttemplate="%{text}",
        textfont=dict(color="rgba(0,0,0,0.65)", size=9), colorbar=dict(title="kept", tickformat=".0%"),
        hovertemplate="block %{y}, %{x}<br>%{customdata}<extra></extra>"))
    fig.update_layout(**_LAYOUT, height=max(300, 60 + 16 * len(heat["blocks"])),
                      title=dict(text=title or "kept rank per layer (D = runs dense)", x=0.01, font=dict(size=14)))
    fig.update_yaxes(title="block", autorange="reversed", type="category")
    fig.update_xaxes(title="module", side="bottom", type="category")  # on top it ran into the title
    fig.update_layout(margin=dict(l=60, r=20, t=50, b=60))
    return fig


def run_figure(history: pd.DataFrame, stop_ratio: float | None = None, title: str = "") -> go.Figure:
    """A scoring run's loss (and NLL), λ (log) and size ratio vs step; a fine-tuning run's loss, NLL
    and distillation term (it has no λ and no size schedule)."""
    if history is None or not len(history):
        return empty_figure("no steps logged yet")
    if "reg_weight" not in history:  # a fine-tuning run
        fig = go.Figure()
        for col, name, color in (("loss", "loss", "#4f46e5"), ("nll", "NLL", "#0891b2"), ("kd", "KD (KL)", "#059669")):
            if col in history and history[col].notna().any():
                fig.add_trace(go.Scatter(x=history.step, y=history[col], name=name, line=dict(color=color)))
        fig.update_layout(**_LAYOUT, height=380, title=dict(text=title, x=0.01, font=dict(size=14)),
                          xaxis_title="step", yaxis_title="loss")
        return fig
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("loss", "λ (L1 weight)", "size ratio"))
    fig.add_trace(go.Scatter(x=history.step, y=history.loss, name="loss", line=dict(color="#4f46e5")), 1, 1)
    if "nll" in history:
        fig.add_trace(go.Scatter(x=history.step, y=history.nll, name="NLL", line=dict(color="#0891b2")), 1, 1)
    fig.add_trace(go.Scatter(x=history.step, y=history.reg_weight, name="λ", line=dict(color="#ca8a04"),
                             showlegend=False), 2, 1)
    fig.add_trace(go.Scatter(x=history.step, y=history.size_ratio, name="size ratio",
                             line=dict(color="#dc2626"), showlegend=False), 3, 1)
    if stop_ratio:
        fig.add_hline(y=stop_ratio, row=3, col=1, line=dict(color="#6b7280", dash="dash"),
                      annotation_text=f"stop {stop_ratio}", annotation_position="bottom left")
    post = history[history.phase != "acip"] if "phase" in history else history.iloc[0:0]
    if len(post):
        fig.add_vrect(x0=post.step.iloc[0] - 0.5, x1=post.step.iloc[-1] + 0.5, fillcolor="#e5e7eb",
                      opacity=0.5, line_width=0, annotation_text="post-tune", annotation_position="top left")
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_yaxes(range=[0, 1.02], row=3, col=1)
    fig.update_xaxes(title="step", row=3, col=1)
    fig.update_layout(**_LAYOUT, height=560, title=dict(text=title, x=0.01, font=dict(size=14)))
    return fig

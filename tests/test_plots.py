"""The curve figure: readable log ticks, a title that is not covered, a hint when baselines are clipped."""

import pandas as pd
import pytest

from acip_core.evaluation import plots
from acip_core.evaluation.curve import comparable_value, curve_at, interp_log, smallest_measured, suggested_ratio


def _curve():
    return pd.DataFrame(dict(
        method=["original", "acip", "acip", "acip", "magnitude", "magnitude"],
        size_ratio=[1.0, 0.4, 0.7, 1.0, 0.4, 0.7], params=[100, 60, 80, 100, 60, 80],
        ppl_heldout=[36.6, 100.0, 51.6, 36.6, 55000.0, 9000.0]))


def test_log_ticks_are_full_numbers():
    ticks = plots.log_ticks(20, 400)
    assert ticks["tickvals"] == [20, 50, 100, 200] and ticks["ticktext"] == ["20", "50", "100", "200"]
    fig = plots.curve_figure(_curve(), title="t")
    assert "2" not in fig.layout.yaxis.ticktext and "200" in fig.layout.yaxis.ticktext


def test_clipped_baselines_are_said_and_the_title_has_room():
    fig = plots.curve_figure(_curve(), title="tiny: perplexity vs size")
    notes = [a.text for a in fig.layout.annotations]
    assert any("magnitude" in n and "above the frame" in n for n in notes)
    assert fig.layout.margin.t >= 90 and fig.layout.title.text.startswith("tiny: perplexity vs size")
    # the eval set is named in the title; the y title stays short (a long one was cut and ran into the
    # title at 1024 px); the hint sits at the bottom left, clear of the top tick
    assert "held-out" in fig.layout.title.text and fig.layout.yaxis.title.text == "perplexity (log)"
    (hint,) = [a for a in fig.layout.annotations if "above the frame" in a.text]
    assert (hint.x, hint.y, hint.yanchor) == (0.01, 0.01, "bottom")


def test_measured_points_carry_their_spread():
    measured = pd.DataFrame([dict(kind="perplexity", size_ratio=0.7, params=80, data="corpus:heldout",
                                  windows=8, format="int8", perplexity=50.0, ppl_low=45.0, ppl_high=56.0)])
    fig = plots.curve_figure(_curve(), measured=measured)
    (point,) = [t for t in fig.data if t.name.startswith("measured")]
    assert list(point.error_y.array) == [6.0] and list(point.error_y.arrayminus) == [5.0]
    assert point.customdata[0][2] == "int8"  # the hover names the format it was measured in


def test_curve_analytics():
    curve = _curve()
    at = curve_at(curve, 0.55)
    assert at["metric"] == "ppl_heldout" and at["original"] == 36.6 and at["span"] == (0.4, 1.0)
    assert 51.6 < at["value"] < 100 and at["value"] == interp_log([0.4, 0.7], [100.0, 51.6], 0.55)
    assert curve_at(curve, 0.2)["value"] is None
    assert suggested_ratio(curve) == 1.0 and suggested_ratio(curve, within=1.5) == 0.7
    # the artifact's own method by name: `curve --methods` appends re-measured baselines after it
    baseline = pd.DataFrame([dict(method="svd-magnitude", size_ratio=r, params=50, ppl_heldout=1e6)
                             for r in (0.3, 0.5)])
    moved = pd.concat([curve[curve.method == "original"], baseline, curve[curve.method != "original"]])
    assert curve_at(moved, 0.55) == at and smallest_measured(moved) == 0.4
    assert suggested_ratio(moved, within=1.5) == 0.7


def _formats_curve():
    rows = [dict(method="original", format=f, size_ratio=1.0, gb=g, ppl_heldout=36.6)
            for f, g in (("int8", 0.2), ("int4-g32", 0.1))]
    for method, shift in (("acip", 0), ("svd-magnitude", 20), ("whitened-magnitude", 10)):
        for fmt, gb in (("int8", 0.2), ("int4-g32", 0.1), ("int8+fast", 0.21)):
            rows += [dict(method=method, format=fmt, size_ratio=r, gb=gb * r, ppl_heldout=40 + shift + 10 * (1 - r))
                     for r in (0.4, 0.7)]
    return pd.DataFrame(rows)


def test_one_colour_per_method_and_formats_told_apart_by_dash_or_marker():
    """In int8 the ACIP line had svd-magnitude's green, in int4 whitened-magnitude's orange."""
    seen = {}
    for dtype in ("int8", "int4-g32", "int8+fast"):
        fig = plots.curve_figure(_formats_curve(), "size_ratio", dtype)
        for t in fig.data:
            if t.name.startswith(("acip", "svd-magnitude", "whitened-magnitude")):
                seen.setdefault(t.name.split()[0], set()).add(t.line.color)
    assert all(len(c) == 1 for c in seen.values()), seen  # one colour per method in every format
    assert len({c for cs in seen.values() for c in cs}) == 3  # and no two methods share one
    fig = plots.curve_figure(_formats_curve(), "gb", "int8")
    styles = [(t.line.dash, t.marker.symbol) for t in fig.data if t.name.startswith("acip ")]
    assert len(styles) == 3 and len(set(styles)) == 3, styles  # each format its own dash/marker


def test_a_measurement_is_compared_with_its_own_formats_line_at_its_window_length():
    """Measure set a perplexity beside the curve's first format (float32 beside an int8 measurement) and
    at any window length; `curve --formats/--seq-len` add lines beside the kept (256-token) ones."""
    kept = pd.DataFrame([dict(method=m, format="float32", size_ratio=r, ppl_heldout=p) for m, r, p in
                         (("original", 1.0, 36.6), ("acip", 0.4, 100.0), ("acip", 0.7, 51.6))])
    added = pd.DataFrame([dict(method="acip", format="int8", size_ratio=r, ppl_heldout=p, seq_len=128)
                          for r, p in ((0.4, 130.0), (0.7, 70.0))])
    curve = pd.concat([kept, added], ignore_index=True)
    assert comparable_value(curve, 0.7, "ppl_heldout", "float32", 256) == pytest.approx(51.6)  # no seq_len: 256
    assert comparable_value(curve, 0.7, "ppl_heldout", "int8", 128) == pytest.approx(70.0)
    assert comparable_value(curve, 0.7, "ppl_heldout", "int8", 256) is None
    assert comparable_value(curve, 0.7, "ppl_heldout", "float32", 128) is None
    assert comparable_value(curve, 0.7, "ppl_heldout", "int4-g32", 256) is None  # never measured in it
    assert comparable_value(curve, 0.7, "ppl_domain", "float32", 256) is None
    assert comparable_value(None, 0.7, "ppl_heldout", "float32", 256) is None

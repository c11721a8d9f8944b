"""What the app says, with no gradio in it: the help texts, and the Markdown and tables that describe
a size, a budget, a measurement, a chat reply, a sweep and the scoring runs. app_handlers.py imports
this module as `text`; every function takes plain values (an Explorer's dicts, results rows) and
returns Markdown, a string or a DataFrame.
"""

from __future__ import annotations

import math
import time

import pandas as pd

from acip_core.evaluation.curve import eval_set_label
from acip_core.serving import public
from acip_core.serving.public import md_escape
from acip_core.system.units import format_gb, gb_up  # noqa: F401  (gb_up: the app's budget box)
from acip_core.training.plan import GiB

# the "What am I looking at?" panel (its README references are section titles)
HELP = """
**ACIP** (Any Compression via Iterative Pruning; Genzel et al., 2025) factorizes every linear layer of
a language model by SVD and runs one scoring pass that ranks *all* singular values of *all* layers by
how much the model needs them. Any size is then a prefix of that ranking: no retraining per size.

- **Size ratio**: the kept fraction of the compressed layers' parameters (1.0 = the original model).
  Embeddings, norms and the output head are never compressed, which is why the total parameters and
  the **GB** shrink less than the ratio; GB also depends on the weights' format (2 bytes in bfloat16,
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
            lines.append(f"| {f['format']} | — | needs ≥ {format_gb(f['smallest_gb'])} | | |")
            continue
        # no perplexity: a size outside the curve's measured sizes
        ppl = f"≈ {f['perplexity']:.1f}" if f.get("perplexity") is not None else "not measured"
        mark = " **(best)**" if f.get("best") else ""
        lines.append(f"| {f['format']}{mark} | **{slider_ratio(f['size_ratio']):.3f}** | {format_gb(f['gb'])} | "
                     f"{format_gb(f['budget_left_gb'], left=True)} | {ppl} |")
    best = answer.get("best")
    if best and answer.get("measured"):
        lines += ["", f"The slider moved to the best: size {slider_ratio(best['size_ratio']):.3f} in {best['format']}, "
                      f"{answer['rule']}. The runners-up are the other rows."]
    elif best:
        small = answer.get("smallest_measured")
        need = (f" The smallest measured model is size {small['size_ratio']:.3f} in {small['format']}: it needs "
                f"{format_gb(small['gb'])}." if small else "")
        lines += ["", f"No size that fits was measured: the slider moved to the largest that fits, size "
                      f"{slider_ratio(best['size_ratio']):.3f} in {best['format']}, whose quality is unknown "
                      f"(an extrapolation, likely unusable).{need}"]
    return "\n".join(lines)


def perplexity_text(row: dict, min_windows: int = 32) -> str:
    """A measured perplexity with its spread, and a warning when it cannot be told from the curve.
    One window has no spread (a standard error needs two): that is said, never "± 0 %"."""
    where = (f"at size {row['size_ratio']:.3f} ({row['format']}) on {row['data']}: {row['windows']} "
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
    shown = repr(text[:60])  # a message never echoes a huge field
    try:
        numbers = [float(x) for x in text.replace(";", ",").replace(":", ",").split(",") if x.strip()]
    except ValueError:
        numbers = None
    if text.count(":") == 2 and numbers is not None and len(numbers) == 3:
        hi, lo, step = numbers
        if not (step > 0 and all(map(math.isfinite, numbers))):
            numbers = None
        else:
            span = (hi - lo) / step + 1e-9  # the count, before any list is built
            if not span < limit:
                raise ValueError(f"at most {limit} sizes per sweep, got {span + 1:.3g} in {shown}")
            if span < 0:
                raise ValueError(f"a range runs from high to low (high:low:step), got {shown}")
            numbers = [round(hi - i * step, 6) for i in range(max(math.floor(span) + 1, 0))]
    elif ":" in text:
        numbers = None
    if numbers is None:
        raise ValueError(f"sizes must be numbers separated by commas (e.g. 1.0, 0.8, 0.6) or "
                         f"a range high:low:step (e.g. 1.0:0.4:0.1), got {shown}")
    sizes = sorted(set(numbers), reverse=True)
    if not sizes:
        raise ValueError("give at least one size: numbers separated by commas (e.g. 1.0, 0.8, 0.6) or a "
                         "range high:low:step (e.g. 1.0:0.4:0.1)")
    if any(not (math.isfinite(s) and 0 <= s <= 1) for s in sizes):
        raise ValueError(f"every size must be within [0, 1], got {shown}")
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
    keep = ["time", "kind", "size_ratio", "format", "data"] + metrics + \
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

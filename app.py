"""ACIP Studio web app (Gradio): UI only. Handlers translate UI values <-> acip_core.explorer calls.

Run `python app.py` (or `make run`). The artifact shown first is $ACIP_ARTIFACT, else
precomputed/smollm2-135m-instruct, else any other artifact found (precomputed/*, finished runs/*).
Heavy objects (models) live in a module-level registry of Explorers, never in gr.State.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import pandas as pd

from acip_core import plots, public
from acip_core.artifact import problem as artifact_problem
from acip_core.data import DATA_CHOICES, DEFAULT_DATA
from acip_core.evaluate import Cancelled
from acip_core.explorer import DTYPE_CHOICES, MAX_PROMPT_CHARS, Explorer, ScoringJobs
from acip_core.models import EMBEDDED, cache_dir, pick_device

log = logging.getLogger("acip_studio")
ROOT = Path(__file__).resolve().parent
PRECOMPUTED = ROOT / "precomputed"
DEFAULT_ARTIFACT = os.environ.get("ACIP_ARTIFACT") or str(PRECOMPUTED / "smollm2-135m-instruct")
# inside Gradio's cache: a file returned from there is served as it is, not copied (an export is
# written once); bounded by public.limits().exports_bytes, oldest first
EXPORTS = Path(gr.utils.get_upload_folder()) / "acip-studio"
JOBS = ScoringJobs(os.environ.get("ACIP_RUNS") or ROOT / "runs")
MAX_LOADED = 2  # artifacts kept in memory at once (each holds its base model)
X_AXES = {"size ratio": "size_ratio", "GB": "gb"}
EXAMPLES = ["What is the capital of France?", "Explain what a package manager does, in two sentences.",
            "Write a haiku about autumn.", "Give three tips for writing clear emails."]
CSS = """
#title h1 {margin-bottom: 0}
#status {min-height: 1.5em}
#size-badge {text-align: right}
footer {display: none !important}
"""

_EXTRA_ARTIFACTS: list[str] = []  # folders given to build_demo(artifact_dirs=...)
_EXPLORERS: OrderedDict[str, Explorer] = OrderedDict()
_LOADING: dict[str, threading.Event] = {}
_LOAD_TIMES: dict[str, float] = {}
_LOAD_STATUS: dict[str, str] = {}
_LOAD_ERRORS: dict[str, str] = {}
_REGISTRY_LOCK = threading.Lock()
_STOPS: dict[tuple[str, str], threading.Event] = {}


# -- artifacts ----------------------------------------------------------------------------------
def artifact_choices() -> list[tuple[str, str]]:
    """(label, folder) of every usable artifact: given dirs, $ACIP_ARTIFACT, precomputed/*, runs/*."""
    found = [Path(p) for p in _EXTRA_ARTIFACTS] + [Path(DEFAULT_ARTIFACT)]
    if PRECOMPUTED.is_dir():
        found += sorted(p for p in PRECOMPUTED.iterdir() if p.is_dir())
    found += JOBS.artifacts()
    choices, seen = [], set()
    for folder in found:
        key = str(folder.resolve())
        if key in seen or not (folder / "acip.json").is_file():
            continue
        if str(folder) != DEFAULT_ARTIFACT and artifact_problem(folder):  # broken: not offered (the
            continue  # default stays, so the status line says what is wrong with it)
        seen.add(key)
        where = "run" if folder.resolve().parent == JOBS.root.resolve() else folder.parent.name or "folder"
        choices.append((f"{folder.name} ({where})", str(folder)))
    return choices


def default_artifact() -> tuple[str | None, str]:
    """The artifact to show first, and a note when it is not the requested one."""
    choices = artifact_choices()
    if (Path(DEFAULT_ARTIFACT) / "acip.json").is_file():
        return DEFAULT_ARTIFACT, ""
    hint = (f"The default artifact `{DEFAULT_ARTIFACT}` is not there yet (its scoring run may still be in "
            "progress; set `ACIP_ARTIFACT=folder` to choose another).")
    if choices:
        return choices[0][1], f"{hint} Showing `{choices[0][1]}` instead."
    return None, (f"{hint} No other artifact was found: start a scoring run in the **Score** tab, or run "
                  f"`python -m acip_core score --out {PRECOMPUTED / 'smollm2-135m-instruct'}`.")


def start_loading(folder: str) -> None:
    """Loads an artifact in a background thread (once); its progress text is in _LOAD_STATUS."""
    with _REGISTRY_LOCK:
        if folder in _EXPLORERS or folder in _LOADING:
            return
        event = _LOADING[folder] = threading.Event()
    threading.Thread(target=_load, args=(folder, event), daemon=True, name=f"load {folder}").start()


def _load(folder: str, event: threading.Event) -> None:
    def on_basis(i, n):
        _LOAD_STATUS[folder] = f"building the activation-whitened basis (once, then cached): layer {i}/{n}"

    try:
        _LOAD_STATUS[folder] = ("loading the base model and the basis (the first load on a machine also "
                                "runs a calibration pass and builds the basis: minutes on a CPU)")
        start = time.perf_counter()
        explorer = Explorer.open(folder, on_basis)
        _LOAD_TIMES[folder] = time.perf_counter() - start
        with _REGISTRY_LOCK:
            _EXPLORERS[folder] = explorer
            while len(_EXPLORERS) > MAX_LOADED:
                _EXPLORERS.popitem(last=False)
        _LOAD_ERRORS.pop(folder, None)
        log.info("loaded %s in %.1f s", folder, _LOAD_TIMES[folder])
    except Exception as err:
        log.exception("loading %s failed", folder)
        _LOAD_ERRORS[folder] = f"{type(err).__name__}: {err}"
    finally:
        with _REGISTRY_LOCK:
            _LOADING.pop(folder, None)
        event.set()


def _check_folder(folder: str) -> None:
    if not folder:
        raise gr.Error("No artifact is selected: pick one above, or create one in the Score tab.")
    if folder not in _EXPLORERS and folder not in {f for _, f in artifact_choices()}:
        raise gr.Error(f"{folder!r} is not one of the available artifacts.")


def get_explorer(folder: str) -> Explorer:
    """The Explorer of an artifact folder, loaded once (concurrent callers wait for the one load)."""
    _check_folder(folder)
    with _REGISTRY_LOCK:
        if folder in _EXPLORERS:
            _EXPLORERS.move_to_end(folder)
            return _EXPLORERS[folder]
    start_loading(folder)
    event = _LOADING.get(folder)
    if event is not None:
        event.wait()
    with _REGISTRY_LOCK:
        if folder in _EXPLORERS:
            return _EXPLORERS[folder]
    raise gr.Error(f"Could not load the artifact {folder}: {_LOAD_ERRORS.get(folder, 'unknown error')}")


def wait_loaded(folder: str):
    """Yields a progress line every half second while `folder` loads (nothing if it is loaded)."""
    _check_folder(folder)
    start_loading(folder)
    start = time.perf_counter()
    while folder not in _EXPLORERS and folder in _LOADING:
        yield (f"Loading **{Path(folder).name}**: {_LOAD_STATUS.get(folder, 'starting')} "
               f"({time.perf_counter() - start:.0f} s)")
        time.sleep(0.5)


def preload(folder: str | None) -> None:
    """Starts loading the first artifact at startup, so the first visitor does not wait."""
    if folder:
        start_loading(folder)


# -- error handling -----------------------------------------------------------------------------
def ui_errors(fn):
    """Bad input (ValueError & co.) becomes a gr.Error with its message; anything else a short one."""
    def translate(err):
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, (ValueError, FileNotFoundError, FileExistsError, RuntimeError)):
            return gr.Error(str(err))
        log.exception("handler %s failed", fn.__name__)
        return gr.Error(f"Internal error ({type(err).__name__}); the server log has the details.")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise translate(err) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise translate(err) from None
    return wrapper


def _stop_event(request: gr.Request | None, kind: str) -> threading.Event:
    key = (getattr(request, "session_hash", None) or "anonymous", kind)
    with _REGISTRY_LOCK:
        return _STOPS.setdefault(key, threading.Event())


# -- formatting ---------------------------------------------------------------------------------
def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n:,}"


def summary_frame(s: dict, ppl: float | None = None, ref: float | None = None,
                  span: tuple | None = None) -> pd.DataFrame:
    rows = [("size ratio (target layers)", f"{s['size_ratio']:.4f}"),
            ("parameters", f"{_millions(s['params'])} of {_millions(s['original_params'])} "
                           f"({100 * s['params_fraction']:.1f} %)"),
            ("weights in float32", f"{s['gb_float32']:.4f} GB"),
            ("weights in bfloat16", f"{s['gb_bfloat16']:.4f} GB"),
            ("layers", f"{s['low_rank_layers']} low-rank · {s['dense_layers']} dense (of {s['layers']})"),
            ("kept singular values", f"{100 * s['kept_rank_fraction']:.1f} %")]
    if "budget_left_gb" in s:
        rows.append((f"budget left ({s['dtype']})", f"{s['budget_left_gb']:.4f} GB of {s['budget_gb']:g} GB"))
    if ppl is not None:
        rows.append(("perplexity (curve, interpolated)", f"≈ {ppl:.4g}" + (f" (original {ref:.4g})" if ref else "")))
    elif span is not None:
        rows.append(("perplexity (curve)", f"outside the curve's sizes {span[0]:.2f}–{span[1]:.2f}: "
                                           "measure it in the Measure tab"))
    return pd.DataFrame(rows, columns=["", "this size"])


def layers_frame(table: pd.DataFrame) -> pd.DataFrame:
    table = table.rename(columns={"full_rank": "full rank", "mean_kept_rank": "kept rank",
                                  "kept_percent": "kept %", "low_rank": "low-rank"})
    table["module"] = table["module"].str.removesuffix("_proj")
    return table


def _curve_ppl(ex: Explorer, size_ratio: float, metric: str | None):
    curve, cols = ex.curve, plots.ppl_columns(ex.curve)
    metric = metric if metric in cols else (cols[0] if cols else None)
    if metric is None:
        return None, None, None
    acip = curve[(curve.method != "original") & curve[metric].notna()]
    acip = acip[acip.method == acip.method.iloc[0]] if len(acip) else acip
    ref = curve[curve.method == "original"][metric]
    span = (float(acip.size_ratio.min()), float(acip.size_ratio.max())) if len(acip) else None
    return (plots._interp_log(acip.size_ratio, acip[metric], size_ratio),
            float(ref.iloc[0]) if len(ref) else None, span)


def _curve(ex: Explorer, summary: dict | None, x_axis: str, dtype: str, metric: str | None):
    return plots.curve_figure(ex.curve, X_AXES.get(x_axis, "size_ratio"), dtype,
                              metric if metric in plots.ppl_columns(ex.curve) else None,
                              summary, ex.results(), title=f"{ex.name}: perplexity vs size")


def _speed(tag: str, snap: dict) -> str:
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


# -- handlers: Explore --------------------------------------------------------------------------
@ui_errors
def on_start():
    """Page load: pick the first artifact, report its loading progress, then fill every view."""
    folder, note = default_artifact()
    note = note + "\n\n" if note else ""
    dd = gr.update(choices=artifact_choices(), value=folder)
    if folder is None:
        empty = plots.empty_figure("no artifact loaded")
        yield (dd, note, gr.update(), gr.update(), gr.update(), None, None, empty, empty, "")
        return
    for line in wait_loaded(folder):
        yield (dd, note + line) + (gr.update(),) * 8
    try:
        ex = get_explorer(folder)
    except gr.Error as err:  # said in the status line, where it stays visible
        empty = plots.empty_figure("the artifact could not be loaded")
        yield (dd, f"{note}**{err.message}** Pick another artifact above, or create one in the Score tab.",
               gr.update(), gr.update(), gr.update(), None, None, empty, empty, "")
        return
    ratio = math.ceil(suggested_ratio(ex) * 1000) / 1000
    budget = math.ceil(ex.size_for(ratio)["gb_float32"] * 1000) / 1000
    yield (dd, note + status_text(folder), ratio, budget, metric_update(ex)) + \
        on_size(folder, ratio, "size ratio", "float32", None)


def suggested_ratio(ex: Explorer) -> float:
    """A first size worth looking at: the smallest curve size within 25 % of the original's perplexity."""
    cols = plots.ppl_columns(ex.curve)
    if not cols:
        return 1.0
    curve, m = ex.curve, cols[0]
    ref = curve[curve.method == "original"][m]
    if not len(ref):
        return 1.0
    good = curve[(curve.method != "original") & (curve[m] <= 1.25 * float(ref.iloc[0]))]
    return float(good.size_ratio.min()) if len(good) else 1.0


def metric_update(ex: Explorer):
    cols = plots.ppl_columns(ex.curve)
    return gr.update(choices=cols, value=cols[0] if cols else None)


def status_text(folder: str) -> str:
    ex = _EXPLORERS.get(folder)
    if ex is None:
        return f"`{folder}` is not loaded."
    meta = ex.any_size.meta
    result = meta.get("result", {})
    loaded = f" in {_LOAD_TIMES[folder]:.1f} s" if folder in _LOAD_TIMES else ""
    esc = public.md_escape  # an artifact's fields may come from a visitor's run: shown as text
    return (f"Loaded **{esc(ex.name)}**{loaded}: {esc(meta.get('model', {}).get('source', '?'))} "
            f"({esc(meta.get('model', {}).get('architecture', '?'))}), {len(ex.any_size.targets)} target layers, "
            f"{meta.get('basis', {}).get('recipe', {}).get('kind', '?')} basis, "
            f"{result.get('steps', '?')} scoring steps, stopped at size {result.get('size_ratio_reached', '?')}.")


@ui_errors
def on_artifact(folder, ratio, x_axis, dtype):
    for line in wait_loaded(folder):
        yield (line,) + (gr.update(),) * 6
    try:
        ex = get_explorer(folder)
    except gr.Error as err:
        yield (f"**{err.message}** Pick another artifact.",) + (gr.update(),) * 6
        return
    yield (status_text(folder), metric_update(ex)) + on_size(folder, ratio, x_axis, dtype, None)


@ui_errors
def on_size(folder, ratio, x_axis, dtype, metric):
    """Slider released: summary, layer table, heatmap, curve with the marker."""
    ex = get_explorer(folder)
    summary = ex.size_for(ratio)
    ppl, ref, span = _curve_ppl(ex, summary["size_ratio"], metric)
    size = ex.size(ratio)
    return (summary_frame(summary, ppl, ref, span), layers_frame(ex.layer_table(size)),
            plots.heatmap_figure(ex.rank_heatmap(size)), _curve(ex, summary, x_axis, dtype, metric),
            size_badge(summary))


def size_badge(s: dict) -> str:
    """One line, visible on every tab: the size that Chat (A), Measure and Export use."""
    return (f"**Selected size {s['size_ratio']:.3f}**: {_millions(s['params'])} params, "
            f"{s['gb_float32']:.3f} GB float32 / {s['gb_bfloat16']:.3f} GB bfloat16")


@ui_errors
def on_budget(folder, budget_gb, dtype):
    """Budget: moves the slider to the largest size that fits, and says what is left."""
    ex = get_explorer(folder)
    if budget_gb is None:
        raise gr.Error("Type a memory budget in GB first.")
    try:
        fit = ex.size_for_budget(budget_gb, dtype)
    except ValueError as err:
        raise gr.Error(f"{err}. The smallest size needs {ex.smallest_gb(dtype):.4f} GB.") from None
    ratio = int(fit["size_ratio"] * 1000) / 1000  # floor: that slider value still fits the budget
    return ratio, (f"**{budget_gb:g} GB in {dtype}** fits size **{fit['size_ratio']:.3f}** "
                   f"({_millions(fit['params'])} params, {fit[f'gb_{dtype}']:.4f} GB): "
                   f"**{fit['budget_left_gb']:.4f} GB left**.")


@ui_errors
def on_curve(folder, ratio, x_axis, dtype, metric):
    ex = get_explorer(folder)
    return _curve(ex, ex.size_for(ratio), x_axis, dtype, metric)


# -- handlers: Chat -----------------------------------------------------------------------------
@ui_errors
def on_chat(folder, ratio_a, ratio_b, side_by_side, message, history_a, history_b, max_new_tokens,
            repetition_penalty, dtype, request: gr.Request = None):
    """Streams the reply at size A (and at size B when side by side)."""
    from acip_core.explorer import clean_prompt

    ex = get_explorer(folder)
    message = clean_prompt(message)
    stop = _stop_event(request, "chat")
    stop.clear()
    history_a, history_b = list(history_a or []), list(history_b or [])
    new_a = history_a + [dict(role="user", content=message), dict(role="assistant", content="")]
    new_b = history_b + [dict(role="user", content=message), dict(role="assistant", content="")] \
        if side_by_side else history_b
    if side_by_side:
        stream = ex.compare(ratio_a, ratio_b, message, history_a, history_b, max_new_tokens,
                            repetition_penalty, dtype)
    else:
        stream = ((snap, None) for snap in ex.stream_chat(ratio_a, history_a, message, max_new_tokens,
                                                          repetition_penalty, dtype))
    yield new_a, new_b, "generating…", ""
    try:
        for a, b in stream:
            new_a[-1] = dict(role="assistant", content=a["text"])
            stats = _speed("A", a)
            if b is not None:
                new_b[-1] = dict(role="assistant", content=b["text"])
                stats += "  \n" + _speed("B", b)
            yield new_a, new_b, stats, ""
            if stop.is_set():
                yield new_a, new_b, stats + "  \n*stopped*", ""
                return
    finally:
        stream.close()


def on_chat_stop(request: gr.Request = None):
    _stop_event(request, "chat").set()


def on_chat_clear():
    return [], [], ""


# -- handlers: Measure --------------------------------------------------------------------------
def _results_file(ex: Explorer) -> str | None:
    if not len(ex.results()):
        return None
    path = EXPORTS / "results" / f"{ex.name}-results-{uuid.uuid4().hex[:6]}.csv"
    return str(ex.results_csv(path))


@ui_errors
def on_perplexity(folder, ratio, data, windows, seq_len, dtype, request: gr.Request = None,
                  progress=gr.Progress()):
    ex = get_explorer(folder)
    stop = _stop_event(request, "measure")
    stop.clear()
    progress(0, desc="perplexity")
    try:
        row = ex.measure_perplexity(ratio, data, windows, seq_len, dtype,
                                    on_progress=lambda d, n: progress((d, n), desc="windows", unit="windows"),
                                    should_stop=stop.is_set)
    except Cancelled:
        return "Perplexity cancelled.", ex.results(), _results_file(ex)
    text = (f"Perplexity **{row['perplexity']:.4g}** at size {row['size_ratio']:.3f} ({dtype}) on {data}: "
            f"{row['windows']} windows × {row['seq_len']} tokens in {row['seconds']:.1f} s "
            f"({row['tokens_per_s']:.0f} tokens/s). Added to the curve.")
    return text, ex.results(), _results_file(ex)


@ui_errors
def on_lm_eval(folder, ratio, tasks, limit, batch_size, dtype, request: gr.Request = None,
               progress=gr.Progress()):
    ex = get_explorer(folder)
    stop = _stop_event(request, "measure")
    stop.clear()
    progress(None, desc="lm-eval running (progress in the server log)")
    try:
        row = ex.measure_lm_eval(ratio, tasks, int(limit) if limit else None, batch_size, dtype,
                                 should_stop=stop.is_set)
    except Cancelled:
        return "lm-eval cancelled.", ex.results(), _results_file(ex)
    except ImportError as err:
        raise gr.Error(f"lm-eval support is not available here ({err}).") from None
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if "/" in k and isinstance(v, float))
    return (f"lm-eval at size {row['size_ratio']:.3f}: {metrics or 'no metrics returned'} "
            f"({row['seconds']:.0f} s)."), ex.results(), _results_file(ex)


def on_measure_cancel(request: gr.Request = None):
    _stop_event(request, "measure").set()
    return "Cancelling…"


@ui_errors
def on_results_clear(folder):
    get_explorer(folder).clear_results()
    return pd.DataFrame(), None


def lm_eval_tasks() -> tuple[list[str], list[str]]:
    """(offline tasks, all suggested tasks) from acip_core.lmeval when it is there."""
    try:
        from acip_core.lmeval import OFFLINE_TASKS, PAPER_TASKS
        return list(OFFLINE_TASKS), list(OFFLINE_TASKS) + [t for t in PAPER_TASKS if t not in OFFLINE_TASKS]
    except Exception:
        return [], []


# -- handlers: Export ---------------------------------------------------------------------------
def _prune_exports(max_age_s: float = 3600) -> None:
    root = EXPORTS / "exports"
    if root.is_dir():
        for d in root.iterdir():
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)


@ui_errors
def on_export(folder, ratio, kind, dtype, progress=gr.Progress()):
    ex = get_explorer(folder)
    _prune_exports()
    public.evict_oldest(EXPORTS / "exports", public.limits().exports_bytes)  # oldest first
    dense = kind.startswith("dense")
    size = ex.size(ratio)
    name = f"{ex.name}-size{size.size_ratio:.3f}-{'dense' if dense else 'lowrank'}-{dtype}"
    work = EXPORTS / "exports" / uuid.uuid4().hex[:10]
    progress(None, desc="writing safetensors")
    try:
        info = ex.export(ratio, work / name, dense=dense, dtype=dtype, zip_path=work / f"{name}.zip")
    except ImportError as err:
        raise gr.Error(f"Export is not available yet ({err}).") from None
    finally:
        shutil.rmtree(work / name, ignore_errors=True)  # the zip is what is downloaded
    how = ("`AutoModelForCausalLM.from_pretrained(folder)` in any runtime" if dense else
           "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`")
    text = (f"Exported size **{info['size_ratio']:.3f}** ({info['kind']}, {dtype}, "
            f"{_millions(info['params'])} params) in {info['seconds']:.1f} s: {info['bytes'] / 1e6:.1f} MB "
            f"unzipped. Load the unzipped folder with {how}.")
    return text, info["zip"]


# -- handlers: Score ----------------------------------------------------------------------------
def _runs_frame() -> pd.DataFrame:
    rows = []
    for r in JOBS.list():
        eta = f"≤ {int(r['eta_s'] // 60)} min {int(r['eta_s'] % 60)} s" if r["eta_s"] is not None else ""
        rows.append(dict(run=r["name"], state=r["state"], step=r["step"], phase=r["phase"],
                         loss=None if r["loss"] is None else round(r["loss"], 4),
                         λ=None if r["reg_weight"] is None else f"{r['reg_weight']:.3g}",
                         size_ratio=None if r["size_ratio"] is None else round(r["size_ratio"], 4),
                         elapsed_s=None if r["seconds"] is None else round(r["seconds"]), ETA=eta))
    return pd.DataFrame(rows, columns=["run", "state", "step", "phase", "loss", "λ", "size_ratio",
                                       "elapsed_s", "ETA"])


def _run_view(run: str | None):
    if not run:
        return plots.empty_figure("start a run, or pick one"), ""
    try:
        status = JOBS.status(run)
    except ValueError:
        return plots.empty_figure("no such run"), ""
    fig = plots.run_figure(JOBS.history(run), status["stop_ratio"], title=f"run {run}")
    text = f"**{run}**: {status['state']}: {public.md_escape(status['message'])}"  # visitors' strings: text
    if status["eta_s"] is not None:
        text += f" ETA ≤ {status['eta_s'] / 60:.1f} min (it stops earlier when the stop ratio is reached)."
    if status["state"] == "failed":
        text += f"\n\n```\n{JOBS.output_tail(run, 8).replace('`', chr(0x2cb))}\n```"  # no fence escape
    return fig, text


@ui_errors
def on_score_start(name, model, data, steps, basis, stop_ratio, batch_size, seq_len, token=None, upload=None,
                   request: gr.Request = None):
    public.check_may_score(token)  # public mode: only the owner's token starts runs
    name = (name or "").strip() or time.strftime("run-%Y%m%d-%H%M%S")
    if upload:  # a visitor's own text: checked, kept once, the upload itself removed
        data = str(public.accept_upload(upload))
    JOBS.start(name, model=(model or EMBEDDED).strip(), data=data or DEFAULT_DATA, steps=int(steps),
               basis=basis, stop_ratio=float(stop_ratio), batch_size=int(batch_size), seq_len=int(seq_len),
               checkpoint_every=10, owner=_who(token, request))
    fig, text = _run_view(name)
    return _runs_frame(), gr.update(choices=[r["name"] for r in JOBS.list()], value=name), fig, text


def _who(token, request) -> str | None:
    """Who controls runs: the token holder, this session (public mode), or anyone (local)."""
    return public.owner(token, getattr(request, "session_hash", None))


@ui_errors
def on_score_cancel(run, token=None, request: gr.Request = None):
    if not run:
        raise gr.Error("Pick a run first.")
    JOBS.cancel(run, who=_who(token, request))
    return (_runs_frame(),) + _run_view(run)


@ui_errors
def on_score_resume(run, token=None, request: gr.Request = None):
    if not run:
        raise gr.Error("Pick a run first.")
    public.check_may_score(token)
    JOBS.resume(run, who=_who(token, request))
    return (_runs_frame(),) + _run_view(run)


@ui_errors
def on_score_delete(run, token=None, request: gr.Request = None):
    if not run:
        raise gr.Error("Pick a run first.")
    JOBS.delete(run, who=_who(token, request))
    return _runs_frame(), gr.update(choices=[r["name"] for r in JOBS.list()], value=None), *_run_view(None)


def on_score_poll(run, known):
    """Timer tick: the runs table, the selected run's plots; the run and artifact lists only when
    they changed (re-sending choices would close a dropdown the user has open)."""
    known = dict(known or {})
    choices = artifact_choices()
    folders, names = [f for _, f in choices], [r["name"] for r in JOBS.list()]
    artifacts = gr.update(choices=choices) if folders != known.get("artifacts") else gr.update()
    runs = gr.update(choices=names) if names != known.get("runs") else gr.update()
    frame = _runs_frame()
    row = frame[frame.run == run]
    plot_key = [run, None if row.empty else str(row.iloc[0].to_dict())]
    if plot_key != known.get("plot"):  # redraw only on news: a redraw resets the user's zoom
        fig, text = _run_view(run)
    else:
        fig, text = gr.update(), gr.update()
    return frame, runs, fig, text, artifacts, dict(artifacts=folders, runs=names, plot=plot_key)


def on_runs_list():
    return gr.update(choices=[r["name"] for r in JOBS.list()])


# -- layout -------------------------------------------------------------------------------------
def build_demo(artifact_dirs=None) -> gr.Blocks:
    """The whole UI; wiring only. `artifact_dirs` adds artifact folders to the selector."""
    _EXTRA_ARTIFACTS[:] = [str(a) for a in (artifact_dirs or [])]
    offline_tasks, all_tasks = lm_eval_tasks()
    lim = public.limits()
    # Gradio's cache (uploads, downloads) is cleaned of files older than lim.cache_seconds
    with gr.Blocks(title="ACIP Studio", delete_cache=(lim.cache_seconds, lim.cache_seconds)) as demo:
        known = gr.State({})
        with gr.Row(equal_height=True):
            gr.Markdown("# ACIP Studio\nScore a model once, then get a model of **any size** in milliseconds: "
                        "pick a size or a memory budget, see the trade-off, chat, measure, export.",
                        elem_id="title")
            artifact = gr.Dropdown(choices=[], label="artifact", scale=0, min_width=280)
            dtype = gr.Radio(list(DTYPE_CHOICES), value="float32", label="weights dtype", scale=0, min_width=220)
        with gr.Row():
            status = gr.Markdown("Loading the model…", elem_id="status")
            badge = gr.Markdown(elem_id="size-badge")
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=3):
                        curve = gr.Plot(label="compression–performance curve", elem_id="curve")
                        with gr.Row():
                            x_axis = gr.Radio(list(X_AXES), value="size ratio", label="x axis")
                            metric = gr.Dropdown(choices=[], label="evaluation set")
                    with gr.Column(scale=2):
                        ratio = gr.Slider(0.0, 1.0, value=1.0, step=0.001, label="size ratio",
                                          info="kept fraction of the compressed layers (1 = original)",
                                          elem_id="size-slider")
                        with gr.Row(equal_height=True):
                            budget = gr.Number(label="memory budget (GB)", value=None, minimum=0,
                                               elem_id="budget", scale=2)
                            fit = gr.Button("fit budget", scale=1)
                        budget_text = gr.Markdown(elem_id="budget-text")
                        summary = gr.Dataframe(label="this size", interactive=False, wrap=True,
                                               column_widths=["48%", "52%"], elem_id="summary")
                with gr.Row():
                    with gr.Column(scale=1):
                        heatmap = gr.Plot(label="kept rank per layer", elem_id="heatmap")
                    with gr.Column(scale=1):
                        layers = gr.Dataframe(label="kept rank per module type", interactive=False,
                                              wrap=True, elem_id="layers")
            with gr.Tab("Chat", id="chat"):
                gr.Markdown("Greedy decoding, so two sizes can be compared word for word. "
                            "**A** uses the size chosen in Explore; **B** defaults to the original model.")
                with gr.Row():
                    chat_a = gr.Chatbot(label="A: the selected size", height=420, elem_id="chat-a")
                    chat_b = gr.Chatbot(label="B: the comparison size", height=420, elem_id="chat-b")
                with gr.Row():
                    message = gr.Textbox(placeholder=f"Message (≤ {MAX_PROMPT_CHARS:,} characters)",
                                         show_label=False, scale=5, max_lines=8, elem_id="chat-input")
                    send = gr.Button("Send", variant="primary", scale=1)
                    stop = gr.Button("Stop", scale=0)
                    clear = gr.Button("Clear", scale=0)
                speed = gr.Markdown(elem_id="speed")
                gr.Examples(EXAMPLES, inputs=message)
                with gr.Row():
                    side_by_side = gr.Checkbox(value=True, label="side by side with B")
                    ratio_b = gr.Slider(0.0, 1.0, value=1.0, step=0.001, label="B: size ratio")
                    max_new = gr.Slider(1, 512, value=128, step=1, label="max new tokens", elem_id="max-new")
                    penalty = gr.Slider(1.0, 2.0, value=1.15, step=0.01, label="repetition penalty")
            with gr.Tab("Measure", id="measure"):
                gr.Markdown("Measurements at the size chosen in Explore; each one becomes a point on the curve.")
                with gr.Row():
                    with gr.Column():
                        data = gr.Dropdown(DATA_CHOICES, value="corpus:heldout", label="text",
                                           info="held-out text never used for calibration")
                        with gr.Row():
                            windows = gr.Slider(1, 64, value=8, step=1, label="windows", elem_id="windows")
                            seq_len = gr.Dropdown([128, 256, 512, 1024], value=256, label="tokens per window")
                        with gr.Row():
                            run_ppl = gr.Button("Measure perplexity", variant="primary", elem_id="run-ppl")
                            cancel = gr.Button("Cancel")
                    with gr.Column():
                        tasks = gr.Dropdown(all_tasks, value=offline_tasks[:1], multiselect=True,
                                            allow_custom_value=True, label="lm-eval tasks",
                                            info="offline tasks run here; the paper's tasks need the internet")
                        with gr.Row():
                            limit = gr.Number(value=50, precision=0, minimum=1, label="limit (items per task)")
                            batch = gr.Number(value=8, precision=0, minimum=1, label="batch size")
                        run_eval = gr.Button("Run lm-eval")
                measure_text = gr.Markdown(elem_id="measure-text")
                results = gr.Dataframe(label="results", interactive=False)
                with gr.Row():
                    download = gr.DownloadButton("Download CSV", value=None)
                    clear_results = gr.Button("Clear results")
            with gr.Tab("Export", id="export"):
                gr.Markdown("Writes the size chosen in Explore as a folder (zipped): safetensors, config, "
                            "tokenizer and a model card.")
                with gr.Row():
                    kind = gr.Radio(["low-rank (smallest; trust_remote_code)", "dense (base architecture)"],
                                    value="low-rank (smallest; trust_remote_code)", label="format")
                    export_btn = gr.Button("Export", variant="primary")
                export_text = gr.Markdown(elem_id="export-text")
                export_file = gr.File(label="download", interactive=False)
            with gr.Tab("Score", id="score"):
                gr.Markdown("Start a new scoring run in the background (a separate process: it survives page "
                            "reloads). A finished run appears in the artifact list at the top. "
                            f"Scoring runs on **{pick_device().type}** here. {public.describe(lim)}")
                with gr.Row():
                    run_name = gr.Textbox(label="run name", placeholder="e.g. smollm2-quick (letters, digits, -_.)")
                    model = gr.Textbox(value=EMBEDDED, label="model", info="embedded default or hub id" if lim.public
                                       else "embedded default, local folder or hub id")
                    score_data = gr.Dropdown(DATA_CHOICES, value=DEFAULT_DATA, allow_custom_value=True,
                                             label="calibration text")
                with gr.Row():
                    steps = gr.Number(value=200, precision=0, minimum=1, label="max steps")
                    basis = gr.Radio(["whitened", "svd"], value="whitened", label="basis")
                    stop_ratio = gr.Slider(0.05, 0.95, value=0.4, step=0.05, label="stop at size ratio")
                    batch_size = gr.Number(value=2, precision=0, minimum=1, label="batch size")
                    score_seq = gr.Number(value=128, precision=0, minimum=8, label="tokens per sequence")
                with gr.Row():
                    score_upload = gr.File(label="or upload calibration text (UTF-8 .txt)", file_types=[".txt"],
                                           type="filepath")
                    token = gr.Textbox(label="admin token", type="password", visible=lim.scoring == "token")
                with gr.Row():
                    start = gr.Button("Start run", variant="primary")
                    runs = gr.Dropdown(choices=[], label="run", allow_custom_value=False)
                    cancel_run = gr.Button("Cancel run")
                    resume_run = gr.Button("Resume run")
                    delete_run = gr.Button("Delete run")
                run_text = gr.Markdown()
                runs_table = gr.Dataframe(label="runs", interactive=False)
                run_plot = gr.Plot(label="progress")
                timer = gr.Timer(3.0)

        # -- wiring ---------------------------------------------------------------------------
        explore_out = [summary, layers, heatmap, curve, badge]
        demo.load(on_start, None, [artifact, status, ratio, budget, metric] + explore_out, api_name="start",
                  show_progress="minimal")
        demo.load(on_runs_list, None, runs, api_name="runs")
        artifact.input(on_artifact, [artifact, ratio, x_axis, dtype], [status, metric] + explore_out,
                       api_name="artifact")
        ratio.release(on_size, [artifact, ratio, x_axis, dtype, metric], explore_out, api_name="size",
                      concurrency_limit=4, trigger_mode="always_last")
        for trigger in (x_axis.input, dtype.input, metric.input):
            trigger(on_curve, [artifact, ratio, x_axis, dtype, metric], curve, api_name="curve",
                    concurrency_limit=4, trigger_mode="always_last")
        gr.on([fit.click, budget.submit], on_budget, [artifact, budget, dtype], [ratio, budget_text],
              api_name="budget").success(on_size, [artifact, ratio, x_axis, dtype, metric], explore_out,
                                         api_name=False)

        chat_inputs = [artifact, ratio, ratio_b, side_by_side, message, chat_a, chat_b, max_new, penalty, dtype]
        chat_event = gr.on([send.click, message.submit], on_chat, chat_inputs, [chat_a, chat_b, speed, message],
                           api_name="chat", concurrency_limit=2, concurrency_id="chat")
        stop.click(on_chat_stop, None, None, api_name="chat_stop", queue=False)
        clear.click(on_chat_clear, None, [chat_a, chat_b, speed], api_name="chat_clear", queue=False,
                    cancels=[chat_event])

        measure_out = [measure_text, results, download]
        run_ppl.click(on_perplexity, [artifact, ratio, data, windows, seq_len, dtype], measure_out,
                      api_name="perplexity", concurrency_limit=1, concurrency_id="heavy"
                      ).then(on_curve, [artifact, ratio, x_axis, dtype, metric], curve, api_name=False)
        run_eval.click(on_lm_eval, [artifact, ratio, tasks, limit, batch, dtype], measure_out,
                       api_name="lm_eval", concurrency_limit=1, concurrency_id="heavy")
        cancel.click(on_measure_cancel, None, measure_text, api_name="cancel", queue=False)
        clear_results.click(on_results_clear, artifact, [results, download], api_name="results_clear"
                            ).then(on_curve, [artifact, ratio, x_axis, dtype, metric], curve, api_name=False)

        export_btn.click(on_export, [artifact, ratio, kind, dtype], [export_text, export_file],
                         api_name="export", concurrency_limit=1, concurrency_id="heavy")

        run_view = [runs_table, run_plot, run_text]
        start.click(on_score_start, [run_name, model, score_data, steps, basis, stop_ratio, batch_size, score_seq,
                                     token, score_upload], [runs_table, runs, run_plot, run_text], api_name="score_start")
        cancel_run.click(on_score_cancel, [runs, token], run_view, api_name="score_cancel")
        resume_run.click(on_score_resume, [runs, token], run_view, api_name="score_resume")
        delete_run.click(on_score_delete, [runs, token], [runs_table, runs, run_plot, run_text],
                         api_name="score_delete")
        runs.input(lambda r: (_runs_frame(),) + _run_view(r), runs, run_view, api_name="score_view")
        timer.tick(on_score_poll, [runs, known], [runs_table, runs, run_plot, run_text, artifact, known],
                   api_name="score_poll", show_progress="hidden")
    return demo


def launch_options() -> dict:
    # uploads above the cap are refused by Gradio itself (413), before any handler runs
    return dict(theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, max_file_size=public.limits().upload_bytes)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    public.clean_at_start(exports=EXPORTS / "exports", roots=[cache_dir(), JOBS.root, PRECOMPUTED])
    preload(default_artifact()[0])
    build_demo().queue(default_concurrency_limit=2, max_size=64 if public.is_public() else None).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT") or 7860), **launch_options())

"""The app's event handlers (Gradio): each translates UI values <-> acip_core calls. app.py lays the
page out and wires these; the library never imports gradio (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import functools
import html
import inspect
import logging
import math
import os
import shutil
import threading
import time

import gradio as gr
import pandas as pd

from acip_core import DEFAULT_DATA, EMBEDDED, Cancelled, curve_at, eval_set_label, ppl_columns, suggested_ratio
from acip_core.evaluation import plots  # the app's figures: a view of evaluation results (.importlinter)
from acip_core.serving import public
from acip_core.serving import texts as text
from acip_core.serving.chat import check_history, check_message_count, clean_prompt, message_text
from acip_core.serving.checks import FORMAT_CHOICES, check_float, check_format, check_int
from acip_core.serving.explorer import Explorer
from acip_core.serving.studio import Studio, check_model_source
from app_queue import arrived

log = logging.getLogger("acip_studio")
X_AXES = {"size ratio": "size_ratio", "GB": "gb"}


class StopEvent(threading.Event):
    """A session's Stop/Cancel for one kind of job. It remembers when it was pressed, so a job that was
    still waiting in the queue then (app_queue.arrived: when it entered) is dropped when its turn comes;
    a running job reads is_set() between tokens, windows or batches."""

    pressed_at: float | None = None

    def set(self, at: float | None = None) -> None:
        """`at`: when the Stop request reached the server (app_queue.arrived), so that a message sent
        just after it is not taken for one that waited while it was pressed; now when unknown."""
        self.pressed_at = time.monotonic() if at is None else at
        super().set()

    def came_while_queued(self, arrived_at: float | None) -> bool:
        """Whether Stop was pressed after a job that arrived at `arrived_at` entered the queue (and it
        has not started since: each job clears the event when it starts)."""
        return arrived_at is not None and self.is_set() and self.pressed_at > arrived_at  # set() dates it


# What `Handlers.size` returns, in order: the Explore tab's views (app.py wires them as `explore_out`
# and checks the count). Handlers that lead with other outputs skip these views by this tuple, so a
# new view changes one line, not a hand-counted number in every handler.
EXPLORE_VIEWS = ("summary", "layers", "heatmap", "curve", "badge", "budget", "budget answer")
SKIP_VIEWS = (gr.skip(),) * len(EXPLORE_VIEWS)
STOP_EVENTS = 10_000  # sessions × kinds whose stop button is remembered (Handlers._stop)
ANY_SIZE_KIND = "any size: every size and format in one folder (choose after download: model.set_size)"
CHAT_UPDATE_S = 0.2  # streamed text reaches the page at most this often (see texts.throttled)
EXPORT_KINDS = {"low-rank: smallest files (loads with trust_remote_code)": False,
                "dense: original shapes, no memory saved (for compatibility)": True,
                ANY_SIZE_KIND: None}


def toast(text) -> str:
    """A toast's text as plain text: Gradio renders a toast's message as HTML, and messages echo what
    a visitor typed (a run name, sweep sizes), so an `<img src=…>` in them would be fetched."""
    return html.escape(str(text), quote=False)


def shown(message: str) -> str:
    """A chat message as the panes get it: HTML-escaped. The panes render no Markdown, but Gradio's
    chatbot still renders HTML (an `<img src=…>` in a prompt was fetched by the browser), so the text
    is sent escaped and reads as typed."""
    return html.escape(message, quote=False)


def said(history) -> list[dict]:
    """A pane's history as the model reads it: user and assistant messages, their text unescaped (the
    inverse of `shown`)."""
    return [dict(role=m["role"], content=html.unescape(message_text(m.get("content")))) for m in history
            if isinstance(m, dict) and m.get("role") in ("user", "assistant")]


def ui_errors(fn):
    """A failing handler shows its message as a toast (as text: `toast`) and leaves every output as it
    was (an error status would cover the outputs: the slider, the conversation). Programming errors
    get a short message; the server log has the traceback."""
    def message(err):
        if isinstance(err, gr.Error):
            return err.message
        if isinstance(err, (ValueError, FileNotFoundError, FileExistsError, RuntimeError)):
            return str(err)
        log.exception("handler %s failed", fn.__name__)
        return f"Internal error ({type(err).__name__}); the server log has the details."

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                gr.Warning(toast(message(err)), title="Could not do that", duration=8)
                yield gr.skip()
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            gr.Warning(toast(message(err)), title="Could not do that", duration=8)
            return gr.skip()
    return wrapper


def _request_of(signature: inspect.Signature, self, args, kwargs):
    """A handler call's gr.Request (Gradio passes it by position or by name), or None."""
    return signature.bind_partial(self, *args, **kwargs).arguments.get("request")


def heavy(fn):
    """A heavy job (perplexity, lm-eval, sweep, export): counted against the visitor's hourly quota
    (public.SessionQuota, by session and client IP) before it runs; given back when the request is
    refused for its input (ValueError, FileNotFoundError: no work was done)."""
    refused, signature = (ValueError, FileNotFoundError), inspect.signature(fn)

    def keys(self, args, kwargs):
        return public.visitor_keys(_request_of(signature, self, args, kwargs))

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(self, *args, **kwargs):
            who = keys(self, args, kwargs)
            started = self.quota.take(who)
            try:
                yield from fn(self, *args, **kwargs)
            except refused:
                self.quota.give_back(who, started)
                raise
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self.quota.job(keys(self, args, kwargs), refused):
            return fn(self, *args, **kwargs)
    return wrapper


def dropped_when_stopped(kind: str, answer):
    """A handler whose job is dropped, before any work or quota (place it above @heavy), when its
    visitor pressed Stop/Cancel of `kind` while it waited in the queue (StopEvent): it answers
    `answer` (a generator handler: yields it once) instead of running."""
    def decorate(fn):
        signature = inspect.signature(fn)

        def stopped(self, args, kwargs) -> bool:
            request = _request_of(signature, self, args, kwargs)
            return self._stop(request, kind).came_while_queued(arrived(request))

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(self, *args, **kwargs):
                if stopped(self, args, kwargs):
                    yield answer
                    return
                yield from fn(self, *args, **kwargs)
            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            return answer if stopped(self, args, kwargs) else fn(self, *args, **kwargs)
        return wrapper
    return decorate


class Handlers:
    """Every event handler, for one Studio. Per-visitor values come in and go out as gr.State."""

    def __init__(self, app: Studio):
        self.app = app
        self._stops: dict[tuple[str, str], StopEvent] = {}
        self._lock = threading.Lock()
        self.quota = public.SessionQuota(public.limits().heavy_per_hour)  # heavy jobs per visitor (public)

    # -- artifacts ------------------------------------------------------------------------------
    def folder(self, value) -> str:
        """The folder of the artifact a selector names (Studio.folder_of: names only in public mode; its
        ValueError reaches the visitor as a toast through ui_errors)."""
        return self.app.folder_of(value)

    def explorer(self, value) -> Explorer:
        return self.app.explorer(self.folder(value))

    def _loading(self, value, progress):
        """Yields a status line while the named artifact loads, with a progress bar when the load has counts."""
        folder, first = self.folder(value), None
        for line, state in self.app.loading_lines(folder):
            if progress is not None and state is not None and state.total:
                first = first if first is not None else (state.done, time.perf_counter())  # the rate seen here
                eta = text.eta_text(state.done - first[0], state.total - first[0], time.perf_counter() - first[1])
                progress((state.done, state.total), desc=f"building the basis ({eta})" if eta else
                         "building the basis", unit="layers")
            yield f"Loading **{os.path.basename(folder)}**: {line}"

    def _stop(self, request, kind: str) -> StopEvent:
        """The session's stop event for `kind`; the most recently used STOP_EVENTS are kept (session
        hashes come from visitors, so the table is bounded)."""
        key = (getattr(request, "session_hash", None) or "anonymous", kind)
        with self._lock:
            event = self._stops.pop(key, None) or StopEvent()
            self._stops[key] = event  # the most recent last
            while len(self._stops) > STOP_EVENTS:
                self._stops.pop(next(iter(self._stops)))
            return event

    # -- explore --------------------------------------------------------------------------------
    @ui_errors
    def start(self, progress=gr.Progress()):
        """Page load: pick the first artifact, report its loading progress, then fill every view."""
        folder, note = self.app.default_artifact()
        name = self.app.choice_of(folder)
        note = note + "\n\n" if note else ""
        dd = gr.update(choices=self.app.artifact_choices(), value=name)
        nothing = (gr.skip(), gr.skip()) + SKIP_VIEWS  # ratio, metric, the views
        if name is None:
            yield (dd, note) + nothing
            return
        for line in self._loading(name, progress):
            yield (dd, note + line) + nothing
        try:
            ex = self.explorer(name)
        except RuntimeError as err:  # said in the status line, where it stays visible
            yield (dd, f"{note}**{err}** Pick another artifact above, or create one in the Score tab.") + nothing
            return
        ratio = math.ceil(suggested_ratio(ex.curve) * 1000) / 1000
        yield (dd, note + text.describe_text(ex.describe()), ratio, self._metric_update(ex)) + \
            self.size(name, ratio, "size ratio", "float32", None, None)

    def _metric_update(self, ex: Explorer):
        cols = ppl_columns(ex.curve)
        return gr.update(choices=[(eval_set_label(c), c) for c in cols], value=cols[0] if cols else None)

    @ui_errors
    def artifact(self, folder, ratio, x_axis, format, progress=gr.Progress()):
        """Another artifact (or tuned size: the slider and format move to the size it was tuned at)."""
        for line in self._loading(folder, progress):
            yield (line, gr.skip(), gr.skip(), gr.skip()) + SKIP_VIEWS  # metric, ratio, format, the views
        try:
            ex = self.explorer(folder)
        except RuntimeError as err:
            yield (f"**{err}** Pick another artifact.", gr.skip(), gr.skip(), gr.skip()) + SKIP_VIEWS
            return
        moved = (gr.skip(), gr.skip())
        if ex.tuned:
            ratio = ex.tuned["target"]
            format = ex.tuned["format"] if ex.tuned["format"] in FORMAT_CHOICES else format
            moved = (ratio, format)
        yield (text.describe_text(ex.describe()), self._metric_update(ex)) + moved + \
            self.size(folder, ratio, x_axis, format, None, None)

    def size(self, folder, ratio, x_axis, format, metric, results, fitted=None):
        """The selected size changed (slider, keyboard, typed value, budget), or how it is shown:
        summary, layer table, heatmap, curve, badge and the budget box, all from the one ratio."""
        ex = self.explorer(folder)
        summary = ex.size_for(ratio, format)
        note = text.below_range_note(summary["size_ratio"], ex.describe()["smallest_measured"])
        size = ex.size(ratio)
        at = curve_at(ex.curve, summary["size_ratio"], metric, format=summary["format"])
        if fitted is not None and abs(fitted - float(ratio)) < 1e-9:  # the budget's own answer: kept
            budget, answer = gr.skip(), gr.skip()
        else:  # the selected size's need, not a stale budget, and no answer to a budget no longer shown
            budget, answer = text.gb_up(summary["gb"]), ""  # the badge's GB, to the digit
        return (text.summary_frame(summary, at, note), text.layers_frame(ex.layer_table(size, format)),
                plots.heatmap_figure(ex.rank_heatmap(size, format)), self._curve(ex, summary, x_axis, format, metric, results),
                text.size_badge(summary, note), budget, answer)

    def _curve(self, ex, summary, x_axis, format, metric, results):
        metric = metric if metric in ppl_columns(ex.curve) else None
        return plots.curve_figure(ex.curve, X_AXES.get(x_axis, "size_ratio"), format, metric, summary,
                                  pd.DataFrame([r for r in results or [] if r.get("artifact") == ex.name]),
                                  title=f"{ex.name}: perplexity vs size", tuned=self.app.tuned_sizes(ex))

    @ui_errors
    def on_size(self, folder, ratio, x_axis, format, metric, results, fitted):
        return self.size(folder, ratio, x_axis, format, metric, results, fitted)

    @ui_errors
    def budget(self, folder, budget_gb):
        """Budget: the largest size in every format; the slider and format move to the best one. A budget
        that cannot be answered replaces the previous answer by why (a stale table beside a new budget
        would read as its answer) and moves nothing."""
        ex = self.explorer(folder)
        try:
            if budget_gb is None:
                raise ValueError("Type a memory budget in GB first.")
            answer = ex.budget_answer(budget_gb)
        except ValueError as err:  # it may echo what was typed: shown as text
            return gr.skip(), gr.skip(), f"⚠ {public.md_escape(err)}", gr.skip()
        best, fits = answer["best"], answer["rows"]
        if best is None:
            return gr.skip(), gr.skip(), (f"⚠ {budget_gb:g} GB is smaller than the smallest model in every "
                                          f"format ({text.format_gb(min(f['smallest_gb'] for f in fits))} in "
                                          "the smallest): nothing moved."), gr.skip()
        ratio = text.slider_ratio(best["size_ratio"])  # rounded down: that slider value still fits the budget
        return ratio, best["format"], text.budget_text(float(budget_gb), answer), ratio

    @ui_errors
    def artifact_b(self, folder_b):
        """Chat B's artifact: a tuned size moves B's slider to the size it was tuned at."""
        target = self.app.tuned_target(self.folder(folder_b))
        return gr.skip() if target is None else target

    # -- chat -----------------------------------------------------------------------------------
    @ui_errors
    @dropped_when_stopped("chat", (gr.skip(), gr.skip(), "*stopped before it started*", gr.skip()))
    def chat(self, folder, ratio_a, folder_b, ratio_b, side_by_side, message, history_a, history_b,
             max_new_tokens, repetition_penalty, format, request: gr.Request = None):
        """Streams the reply at size A (and at size B, of this or another artifact, when side by side)."""
        ex = self.explorer(folder)
        ex_b = self.explorer(folder_b) if side_by_side and folder_b else ex
        message = clean_prompt(message)
        note = text.below_range_note(ex.size(ratio_a).size_ratio, ex.describe()["smallest_measured"])
        if note:
            gr.Warning(toast(f"Size A {float(ratio_a):.3f}: {note}"), title="Size A")
        stop = self._stop(request, "chat")
        stop.clear()
        shown_a, shown_b = check_message_count(history_a), check_message_count(history_b)
        history_a, history_b = said(shown_a), said(shown_b)  # what the model reads: the text itself
        for history in (history_a, history_b):  # before anything is shown: a forged history is refused
            check_history(history)
        turn = [dict(role="user", content=shown(message)), dict(role="assistant", content="")]
        new_a, new_b = shown_a + turn, (shown_b + [dict(t) for t in turn]) if side_by_side else shown_b
        waiting = [x.name for x in {ex, ex_b} if not x.format_ready(format)]  # a bad format: refused here
        if side_by_side:
            stream = ex.compare(ratio_a, ratio_b, message, history_a, history_b, max_new_tokens,
                                repetition_penalty, format, other=ex_b)
        else:
            stream = ((snap, None) for snap in ex.stream_chat(ratio_a, history_a, message, max_new_tokens,
                                                              repetition_penalty, format))
        yield new_a, new_b, (f"preparing {format} for {', '.join(waiting)} (its first use in this process: the "
                             "factors are quantized once, up to a minute or two on a CPU)…" if waiting else "generating…"), ""
        try:
            for a, b in text.throttled(stream, CHAT_UPDATE_S):
                new_a[-1] = dict(role="assistant", content=shown(text.reply(a)))
                stats = text.speed_line("A", a)
                if b is not None:
                    new_b[-1] = dict(role="assistant", content=shown(text.reply(b)))
                    stats += "  \n" + text.speed_line("B" + ("" if ex_b is ex else f" ({ex_b.name})"), b)
                yield new_a, new_b, stats, ""
                if stop.is_set():
                    yield new_a, new_b, stats + "  \n*stopped*", ""
                    return
        finally:
            stream.close()

    def chat_stop(self, request: gr.Request = None):
        self._stop(request, "chat").set(at=arrived(request))

    @ui_errors
    @heavy
    def sweep(self, folder, sizes, message, max_new_tokens, format, request: gr.Request = None):
        """One prompt answered by many sizes, one after another (greedy), as a grid of replies."""
        ex = self.explorer(folder)
        ratios = text.parse_sizes(sizes)
        message = clean_prompt(message)
        stop = self._stop(request, "chat")  # Chat's Stop ends a running sweep; a queued one is not dropped
        stop.clear()
        stream = ex.sweep(ratios, message, max_new_tokens, format=format)
        try:
            for snaps in text.throttled(stream, CHAT_UPDATE_S):
                yield text.sweep_frame(ex, ratios, snaps)
                if stop.is_set():
                    return
        finally:
            stream.close()

    # -- measure --------------------------------------------------------------------------------
    def _results_file(self, results, request=None) -> str | None:
        if not results:
            return None
        folder = self.app.download_dir("results", getattr(request, "session_hash", None))
        return str(Explorer.results_csv(results, folder / "acip-results.csv"))

    @ui_errors
    @dropped_when_stopped("measure", ("Measurement cancelled.", gr.skip(), gr.skip(), gr.skip()))
    @heavy
    def perplexity(self, folder, ratio, data, windows, seq_len, format, results, request: gr.Request = None,
                   progress=gr.Progress()):
        ex = self.explorer(folder)
        stop = self._stop(request, "measure")
        stop.clear()
        progress(0.0, desc="reading the text and preparing the size")
        try:
            row = ex.measure_perplexity(ratio, data, windows, seq_len, format, batch_size=2,
                                        on_progress=_with_eta(progress, "windows", "windows"),
                                        should_stop=stop.is_set)
        except Cancelled:
            return "Perplexity cancelled.", gr.skip(), gr.skip(), gr.skip()
        results = list(results or []) + [row]
        return text.perplexity_text(row), text.results_table(results), self._results_file(results, request), results

    @ui_errors
    @dropped_when_stopped("measure", ("Measurement cancelled.", gr.skip(), gr.skip(), gr.skip()))
    @heavy
    def lm_eval(self, folder, ratio, tasks, limit, batch_size, format, results, request: gr.Request = None,
                progress=gr.Progress()):
        ex = self.explorer(folder)
        stop = self._stop(request, "measure")
        stop.clear()
        progress(0.0, desc="loading lm-eval and its tasks")
        try:
            row = ex.measure_lm_eval(ratio, tasks, limit, batch_size, format,  # it checks both
                                     should_stop=stop.is_set,
                                     on_progress=_with_eta(progress, "lm-eval", "requests"))
        except Cancelled:
            return "lm-eval cancelled.", gr.skip(), gr.skip(), gr.skip()
        except ImportError as err:
            raise gr.Error(f"lm-eval support is not available here ({err}).") from None
        results = list(results or []) + [row]
        metrics = ", ".join(f"{k} {text.metric_value(v)}" for k, v in row.items() if "/" in k and isinstance(v, float))
        return (f"lm-eval at size {row['size_ratio']:.3f}: {metrics or 'no metrics returned'} "
                f"({row['seconds']:.0f} s)."), text.results_table(results), self._results_file(results, request), results

    def measure_cancel(self, request: gr.Request = None):
        """Stops this session's running measurement at its next window or batch ("… cancelled."), or
        drops one still waiting for the heavy slot when its turn comes ("Measurement cancelled.")."""
        self._stop(request, "measure").set(at=arrived(request))
        return "Cancelling…"

    # -- export ---------------------------------------------------------------------------------
    @ui_errors
    @heavy
    def export(self, folder, ratio, kind, format, results, request: gr.Request = None, progress=gr.Progress()):
        ex = self.explorer(folder)
        format = check_format(format)  # the key, as the file name shows it
        if kind == ANY_SIZE_KIND:
            return self._export_any_size(ex, format, progress, getattr(request, "session_hash", None))
        dense = EXPORT_KINDS.get(kind, str(kind).startswith("dense"))
        size = ex.size(ratio)
        name = f"{ex.name}-size{size.size_ratio:.3f}-{'dense' if dense else 'lowrank'}-{format}"
        work = self.app.download_dir("exports", getattr(request, "session_hash", None))
        progress(None, desc="writing safetensors and zipping")
        try:
            info = ex.export(ratio, work / name, dense=dense, format=format, zip_path=work / f"{name}.zip",
                             measured=results or [])
        finally:
            shutil.rmtree(work / name, ignore_errors=True)  # the zip (one copy) is what is downloaded
        how = ("`AutoModelForCausalLM.from_pretrained(folder)` in any runtime" if dense else
               "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`")
        what = ("Dense: the original shapes, so it is as large as the base model (no memory saved); "
                "for runtimes without remote code." if dense else "Low-rank: the smallest files.")
        return (f"Exported size **{info['size_ratio']:.3f}** ({info['kind']}, {format}, "
                f"{text.millions(info['params'])} params stored) in {info['seconds']:.1f} s: "
                f"{info['bytes'] / 1e6:.1f} MB unzipped. {what} Load the unzipped folder with {how}."), info["zip"]

    @ui_errors
    @heavy
    def share(self, folder, ratio, kind, format, repo_id, token, private, request: gr.Request = None,
              progress=gr.Progress()):
        """Exports as the Export tab would and uploads the folder to the hub with the visitor's token
        (local mode only: a public server never uploads with a token typed into it)."""
        if public.is_public():
            raise gr.Error("Sharing on the hub is not offered on a public server: export, then push locally "
                           "(python -m acip_core push).")
        dense = None if kind == ANY_SIZE_KIND else EXPORT_KINDS.get(kind, str(kind).startswith("dense"))
        url = self.app.push(self.folder(folder), ratio, dense, format, repo_id, token, private,
                            on_stage=lambda stage: progress(None, desc=stage))  # repo id, token, network first
        return f"Uploaded to the hub as `{str(repo_id).strip()}` ({public.md_escape(url)})."  # checked: user/name

    def _export_any_size(self, ex, format, progress, session=None):
        """The artifact as one any-size folder (export_anysize.py), zipped: float32 weights, or bfloat16
        ones when bfloat16 is selected (half the bytes; int sizes either way)."""
        stored = "bfloat16" if format == "bfloat16" else "float32"
        name = f"{ex.name}-anysize-{stored}"
        work = self.app.download_dir("exports", session)
        progress(None, desc="writing every size and format (int4 codes: about a minute the first time)")
        start = time.perf_counter()
        try:
            out = self.app.export_any_size(ex, work / name, stored)
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            zipped = self.app.zip_folder(out, work / f"{name}.zip")
        finally:
            shutil.rmtree(work / name, ignore_errors=True)
        return (f"Exported **every size** ({stored} weights; formats {', '.join(self.app.any_size_formats(stored))}) in "
                f"{time.perf_counter() - start:.1f} s: {size / 1e6:.1f} MB unzipped. Load the unzipped folder with "
                "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, size_ratio=0.6, "
                "format=\"int4\")`, then `model.set_size(0.8)` or `model.set_size(budget_gb=0.2)` without "
                "reloading."), str(zipped)

    # -- score ----------------------------------------------------------------------------------
    def runs_frame(self) -> pd.DataFrame:
        return text.runs_frame(self.app.runs())

    def run_view(self, run: str | None):
        if not run:
            return plots.empty_figure("start a run, or pick one"), ""
        try:
            status = self.app.run_status(run)
        except ValueError:
            return plots.empty_figure("no such run"), ""
        fig = plots.run_figure(self.app.run_history(run), status["stop_ratio"], title=f"run {run}")
        line = f"**{run}**: {status['state']}: {public.md_escape(status['message'])}"  # visitors' strings: text
        if status["eta_s"] is not None:
            line += f" ETA ≤ {status['eta_s'] / 60:.1f} min"
            line += {"post_tune": " (post-tuning the LoRA: a fixed number of steps).",
                     "finetune": " (fine-tuning a size: a fixed number of steps; then measuring).",
                     }.get(status.get("phase"), " (scoring stops earlier when the stop ratio is reached; "
                                                "post-tuning follows).")
        if status["state"] in ("cancelled", "failed"):
            line += "  \n" + self.resume_note(run)
        if status["state"] == "failed":
            line += f"\n\n```\n{self.app.run_output_tail(run, 8).replace('`', chr(0x2cb))}\n```"  # no fence escape
        return fig, line

    def resume_note(self, run: str) -> str:
        """What Resume will do, said before it is pressed."""
        step = self.app.resume_step(run)
        return (f"**Resume** continues after step {step} (its last checkpoint)." if step else
                "**Resume** starts again at step 1: the run stopped before its first checkpoint.")

    @ui_errors
    def score_start(self, name, model, data, steps, basis, stop_ratio, batch_size, seq_len, post_tune, token=None,
                    upload=None, targets=None, request: gr.Request = None):
        public.check_may_score(token)  # public mode: only the owner's token starts runs
        name = (name or "").strip() or time.strftime("run-%Y%m%d-%H%M%S")
        if upload:  # a visitor's own text: checked, kept once, the upload itself removed
            data = str(public.accept_upload(upload))
        check_model_source(model or EMBEDDED)  # a bad hub id fails now, not after a minute of retries
        self.app.start_scoring(name, model=(model or EMBEDDED).strip(), data=data or DEFAULT_DATA,
                               steps=check_int(steps, 1, None, "max scoring steps"), basis=basis,
                               stop_ratio=check_float(stop_ratio, 0.05, 0.95, "stop at size ratio"),
                               batch_size=check_int(batch_size, 1, None, "batch size"),
                               seq_len=check_int(seq_len, 8, None, "tokens per sequence"),
                               post_tune_steps=check_int(post_tune, 0, None, "post-tune steps"), checkpoint_every=10,
                               owner=_who(token, request), targets=targets)
        fig, line = self.run_view(name)
        return self.runs_frame(), gr.update(choices=self.app.run_names(), value=name), fig, line

    @ui_errors
    def finetune_start(self, folder, ratio, format, objective, steps, token=None, request: gr.Request = None):
        """Explore's "fine-tune this size": a background fine-tuning run of the selected size and format
        (the Score tab follows it; the tuned size joins the artifact list and the curve when done)."""
        public.check_may_score(token)
        folder = self.folder(folder)
        size = self.explorer(folder).size(ratio)
        steps = check_int(steps, 1, None, "steps")
        name = time.strftime(f"ft-{size.size_ratio:.2f}-{objective}-%Y%m%d-%H%M%S").replace("+", "")
        # what may be tuned is fine-tuning's rule (Studio.start_finetune asks it): its ValueError is the toast
        self.app.start_finetune(name, folder, float(ratio), format=format, objective=objective, steps=steps,
                                owner=_who(token, request))
        gr.Info(toast(f"Fine-tuning size {size.size_ratio:.3f} in {format} ({objective}, {steps} steps) as run "
                f"{name}: follow it in the Score tab. When done, it is listed as an artifact and on the curve."))
        return gr.update(choices=self.app.run_names(), value=name)

    @ui_errors
    def score_cancel(self, run, token=None, request: gr.Request = None):
        if not run:
            raise gr.Error("Pick a run first.")
        self.app.cancel_run(run, who=_who(token, request))
        return (self.runs_frame(),) + self.run_view(run)

    @ui_errors
    def score_delete(self, run, token=None, request: gr.Request = None):
        if not run:
            raise gr.Error("Pick a run first.")
        self.app.delete_run(run, who=_who(token, request))
        return (self.runs_frame(), gr.update(choices=self.app.run_names(), value=None),
                *self.run_view(None))

    @ui_errors
    def score_resume(self, run, token=None, request: gr.Request = None):
        if not run:
            raise gr.Error("Pick a run first.")
        public.check_may_score(token)
        note = self.resume_note(run)
        self.app.resume_run(run, who=_who(token, request))
        gr.Info(toast(note.replace("**", "")))
        return (self.runs_frame(),) + self.run_view(run)

    def score_poll(self, run, known):
        """Timer tick: the runs table, the selected run's plots; the run and artifact lists only when
        they changed (re-sending choices would close a dropdown the user has open)."""
        known = dict(known or {})
        choices = self.app.artifact_choices()
        folders, names = [f for _, f in choices], self.app.run_names()
        artifacts = gr.update(choices=choices) if folders != known.get("artifacts") else gr.skip()
        runs = gr.update(choices=names) if names != known.get("runs") else gr.skip()
        frame = self.runs_frame()
        row = frame[frame.run == run]
        plot_key = [run, None if row.empty else str(row.iloc[0].to_dict())]
        if plot_key != known.get("plot"):  # redraw only on news: a redraw resets the user's zoom
            fig, line = self.run_view(run)
        else:
            fig, line = gr.skip(), gr.skip()
        return frame, runs, fig, line, artifacts, artifacts, dict(artifacts=folders, runs=names, plot=plot_key)


@ui_errors
def official_import(app: Studio, source, name, progress=gr.Progress()):
    """The "import an official ACIP model" box (local mode only): converts a hub id or a folder into
    precomputed/<name> (acip_core/artifacts/official.py), with progress; the artifact list then shows it."""
    source = str(source or "").strip()
    progress(0, desc=f"reading {source}")
    name = app.import_official(source, name, on_progress=lambda stage, done, total: progress(done / total, desc=stage))
    return f"Imported `{public.md_escape(source)}` as **{public.md_escape(name)}**: choose it in the artifact list."


def _with_eta(progress, desc: str, unit: str):
    """A progress callback (done, total) whose bar also says the time left at the rate so far."""
    start = time.perf_counter()

    def update(done, total):
        eta = text.eta_text(done, total, time.perf_counter() - start)
        progress((done, total), desc=f"{desc} ({eta})" if eta else desc, unit=unit)
    return update


def _who(token, request) -> str | None:
    """Who controls runs: the token holder, this session (public mode), or anyone (local)."""
    return public.owner(token, getattr(request, "session_hash", None))


def score_plan(model, batch_size, seq_len) -> str:
    """The Score tab's memory plan of the typed model and settings (acip_core/training/plan.py: from the config
    alone, no weights read), as Markdown; a problem is said in its place, never raised (a toast per
    keystroke would be noise)."""
    try:
        source = public.check_model((model or EMBEDDED).strip())
        lim = public.limits()  # what a run may use (a plan's cost grows with batch × seq_len)
        plan = Studio.plan_run(source, check_int(batch_size, 1, lim.max_batch_size, "batch size"),
                               check_int(seq_len, 8, lim.max_seq_len, "tokens per sequence"))
    except Exception as err:  # noqa: BLE001 - any failure is the answer shown, not a crash
        return f"**Memory plan**: not available ({public.md_escape(str(err)[:300])})"
    return text.plan_text(source, plan)

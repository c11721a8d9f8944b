"""The app's engine: one artifact's any-size model, a small cache of materialized sizes, and the
thread-safe jobs the UI asks for (summaries, chat, perplexity, lm-eval, export). Never imports gradio.

Every public method takes a size_ratio (a float in [0, 1]); a size is looked up by its global prefix,
so two ratios that select the same ranks share one materialized model. Materialized models are
independent module trees over shared read-only factors (materialize.py), so concurrent calls at
different sizes never interfere and nothing global is mutated under a running generation.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from acip_core.evaluation.curve import curve_at, rank_for_budget, rule_text, smallest_measured, spread
from acip_core.sources.data import load_text, token_windows
from acip_core.evaluation.evaluate import REPETITION_PENALTY, Cancelled, perplexity
from acip_core.formats.registry import APP_FORMATS, parse_format
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.serving.public import check_data, limits

log = logging.getLogger(__name__)

FORMAT_CHOICES = APP_FORMATS  # the formats the app offers (formats/registry.py)
DTYPE_CHOICES = FORMAT_CHOICES  # the app's selector (one list)
MAX_PROMPT_CHARS = 8000
MAX_NEW_TOKENS = 1024
MAX_HISTORY_CHARS = 200_000  # a longer chat history was not sent by the page; refused
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")  # keeps \t \n \r


# -- sharing the cores ---------------------------------------------------------------------------
class ComputeGate:
    """At most `slots` forward passes run at once in this process (CPU only).

    Every request (two chats, a perplexity job) runs in its own thread, and each forward pass uses
    all of torch's intra-op threads; torch.set_num_threads cannot give each request its own share (it
    is process-wide in effect: a thread that sets it changes the count every new thread starts
    with), and two passes at once oversubscribe the cores, whose OpenMP threads then wait on each
    other. With the gate whole forward passes take turns: concurrent chats interleave token by token,
    each pass on every core. Measured on a quiet 2-core CPU (benchmarks/RESULTS.md "Concurrent
    requests"), taking turns is slower at every load (4 chats: 18.5 against 29.0 tokens/s in all; a
    chat beside a perplexity job waits for its windows: 7.1 against 18.7), so the gate is off by
    default; ACIP_COMPUTE_SLOTS=N turns it on with N slots for hosts whose cores are shared."""

    def __init__(self, slots: int | None = None):
        slots = int(os.environ.get("ACIP_COMPUTE_SLOTS", "0")) if slots is None else slots
        self.slots = slots
        self._sem = threading.BoundedSemaphore(slots) if slots > 0 else None

    def wrap(self, model):
        """Makes `model`'s forward take a slot (a no-op off the CPU or with the gate off). Returns it."""
        if self._sem is None or getattr(model, "_acip_gated", False):
            return model
        if next(model.parameters()).device.type != "cpu":
            return model
        inner, sem = model.forward, self._sem

        def forward(*args, **kwargs):
            with sem:
                return inner(*args, **kwargs)

        model.forward, model._acip_gated = forward, True
        return model


GATE = ComputeGate()


# -- validation ---------------------------------------------------------------------------------
def check_ratio(value, name: str = "size_ratio") -> float:
    """A size ratio as a float in [0, 1]; ValueError with a clear message otherwise."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number within [0, 1], got {value!r}") from None
    if not math.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")
    return ratio


def check_dtype(fmt) -> str:
    """A format key from FORMAT_CHOICES ("int4" alone means its default group size)."""
    try:
        key = parse_format(fmt).key if isinstance(fmt, str) else None
    except ValueError:
        key = None
    if key not in FORMAT_CHOICES:
        raise ValueError(f"format must be one of {list(FORMAT_CHOICES)}, got {fmt!r}")
    return key


def clean_prompt(text, cap: int = MAX_PROMPT_CHARS) -> str:
    """The prompt without control/binary characters; refuses empty and over-long prompts."""
    if not isinstance(text, str):
        raise ValueError(f"the prompt must be text, got {type(text).__name__}")
    text = _CONTROL.sub("", text.replace("\r\n", "\n")).strip()
    if not text:
        raise ValueError("the prompt is empty: type a message first")
    if len(text) > cap:
        raise ValueError(f"the prompt is {len(text):,} characters long; the limit is {cap:,}. "
                         "Shorten it (or split it over several messages).")
    return text


def check_int(value, lo: int, hi: int | None, name: str) -> int:
    """A whole number in [lo, hi] (hi None: no upper bound) from a visitor's value, or a ValueError that
    names it (the app's number fields and every Explorer job use this one check)."""
    within = f"in [{lo}, {hi}]" if hi is not None else f"≥ {lo}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number {within}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < lo or (hi is not None and number > hi):
        raise ValueError(f"{name} must be a whole number {within}, got {value!r}")
    return int(number)


def _float_in(value, lo: float, hi: float, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return number


def check_history(messages: list[dict]) -> None:
    """Refuses a chat history that the page cannot have sent: a message longer than the prompt cap
    (assistant replies: twice that), or more than MAX_HISTORY_CHARS in all."""
    total = 0
    for m in messages:
        cap = MAX_PROMPT_CHARS * (2 if m["role"] == "assistant" else 1)
        if len(m["content"]) > cap:
            raise ValueError(f"the chat history holds a {m['role']} message of {len(m['content']):,} "
                             f"characters (the limit is {cap:,}): press Clear and start again")
        total += len(m["content"])
    if total > MAX_HISTORY_CHARS:
        raise ValueError(f"the chat history is {total:,} characters long (the limit is {MAX_HISTORY_CHARS:,}): "
                         "press Clear and start again")


def check_message_count(history) -> list:
    """A chat history as a list, refused when it holds more than limits().chat_messages messages:
    counted before any message is read or templated, so refusing costs nothing."""
    history = [] if history is None else history
    if not isinstance(history, (list, tuple)):
        raise ValueError("the chat history must be a list of messages: press Clear and start again")
    cap = limits().chat_messages
    if len(history) > cap:
        raise ValueError(f"the chat history holds {len(history):,} messages (the limit is {cap:,}): "
                         "press Clear and start again")
    return list(history)


def message_text(content) -> str:
    """The text of a chat message's content (a string, or Gradio's list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content)
    return ""


# -- streaming generation -----------------------------------------------------------------------
class Generation:
    """One greedy generation running in its own thread; poll() drains its streamed text.

    Fields readable at any time: text, tokens, first_token_s, tokens_per_s, done, error, truncated.
    """

    def __init__(self, model, tokenizer, ids: torch.Tensor, max_new_tokens: int,
                 repetition_penalty: float, truncated: bool = False):
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        gen = self

        class _Streamer(TextIteratorStreamer):
            def put(self, value):
                if not (self.skip_prompt and self.next_tokens_are_prompt):
                    gen.tokens += value.numel()
                    now = time.perf_counter()
                    if gen.first_token_s is None:
                        gen.first_token_s, gen._first_at = now - gen._start, now
                    gen._last_at = now
                super().put(value)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), gen._stop.is_set(), dtype=torch.bool)

        self.text, self.tokens, self.first_token_s, self.error = "", 0, None, None
        self.done, self.truncated, self.prompt_tokens = False, truncated, ids.shape[1]
        self._polled_tokens = 0
        self._stop = threading.Event()
        self._start = self._first_at = self._last_at = time.perf_counter()
        self._streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        device = next(model.parameters()).device
        kwargs = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                      do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                      else tokenizer.eos_token_id,
                      streamer=self._streamer, stopping_criteria=StoppingCriteriaList([_Stop()]))
        self._thread = threading.Thread(target=self._run, args=(model, kwargs), daemon=True)
        self._thread.start()

    def _run(self, model, kwargs):
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as err:  # surfaced to the consumer by poll()
            self.error = err
            self._streamer.text_queue.put(self._streamer.stop_signal)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (the first one includes the prompt's prefill)."""
        if self.tokens < 2 or self._last_at <= self._first_at:
            return None
        return (self.tokens - 1) / (self._last_at - self._first_at)

    def poll(self, timeout: float = 0.05) -> bool:
        """Takes the text streamed so far; True if anything changed. Raises the thread's error."""
        import queue

        changed, wait = self.tokens != self._polled_tokens, timeout
        self._polled_tokens = self.tokens
        while not self.done:
            try:
                piece = self._streamer.text_queue.get(timeout=wait)
            except queue.Empty:
                break
            wait = 0.0
            if piece is self._streamer.stop_signal:
                self.done = changed = True
                self._thread.join(timeout=5)
            else:
                self.text += piece
                changed = True
        if self.done and self.error is not None:
            raise RuntimeError(f"generation failed: {self.error}") from self.error
        return changed

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the generation thread; True when it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self, size_ratio: float) -> dict:
        return dict(text=self.text, tokens=self.tokens, first_token_s=self.first_token_s,
                    tokens_per_s=self.tokens_per_s, done=self.done, truncated=self.truncated,
                    prompt_tokens=self.prompt_tokens, size_ratio=size_ratio)


# -- the explorer -------------------------------------------------------------------------------
class Explorer:
    """One artifact, ready to answer: sizes, tables, chat, measurements, exports.

    Args:
        any_size: the artifact's AnySizeModel.
        curve: the artifact's curve.csv as a DataFrame (None when it has none).
        name: a display name (the artifact folder's name).
        cache_size: how many materialized (size, dtype) models to keep.
    """

    def __init__(self, any_size: AnySizeModel, curve: pd.DataFrame | None = None, name: str = "",
                 folder: str | Path | None = None, cache_size: int = 4):
        self.any_size, self.curve, self.name = any_size, curve, name
        self.folder = Path(folder) if folder else None
        self.tokenizer = any_size.tokenizer
        self.full = any_size.original_size()
        self._sizes: OrderedDict = OrderedDict()  # rounded ratio -> Size
        self._models: OrderedDict = OrderedDict()  # (prefix, dtype) -> nn.Module
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
        from acip_core.artifacts.open import open_folder
        from acip_core.artifacts.tuned import tuned_label

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

    def _summary(self, size: Size, fmt: str = "float32") -> dict:
        total_rank = sum(self.any_size.shapes[n].full_rank for n in size.ranks)
        sized = self.any_size.size_at(size.prefix, check_dtype(fmt))
        return dict(size_ratio=size.size_ratio, params=sized.params, original_params=self.full.params,
                    params_fraction=sized.params / self.full.params, format=sized.format.key,
                    gb=sized.gigabytes, gb_by_format=self.gb_by_format(size),
                    dense_layers=sized.dense_layers, low_rank_layers=len(size.ranks) - sized.dense_layers,
                    layers=len(size.ranks), kept_rank_fraction=sum(size.ranks.values()) / total_rank)

    def size_for(self, ratio, fmt: str = "float32") -> dict:
        """Summary of the size for a ratio in a format: size_ratio, params, GB (this format's and every
        format's), dense layers, ..."""
        target = check_ratio(ratio)
        return dict(self._summary(self.size(target), fmt), target=target)

    def size_for_budget(self, gigabytes, dtype: str = "float32") -> dict:
        """The largest size whose weights fit in `gigabytes` (1e9 bytes) in `dtype`, and what is left."""
        budget = _budget(gigabytes)
        dtype = check_dtype(dtype)
        return self._budget_row(self.any_size.size_for_budget(budget, dtype), dtype, budget)

    def _budget_row(self, size, dtype: str, budget: float) -> dict:
        summary = self._summary(size, dtype)
        return dict(summary, budget_gb=budget, dtype=dtype, budget_left_gb=budget - summary["gb"])

    def smallest_gb(self, dtype: str = "float32") -> float:
        return self.any_size.size_at(0, check_dtype(dtype)).gigabytes

    # -- models -------------------------------------------------------------------------------
    def model(self, ratio, dtype: str = "float32"):
        """The materialized model at a size in a format (cached; shared by every caller of that size)."""
        dtype = check_dtype(dtype)
        size = self.size(ratio)
        key = (size.prefix, dtype)
        with self._lock:
            if key not in self._models:
                self._models[key] = GATE.wrap(self.any_size.materialize(size, dtype))
                while len(self._models) > self._cache_size:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def format_ready(self, dtype: str) -> bool:
        """Whether a size in this format materializes at once (else its family is built first)."""
        return self.any_size.has_family(check_dtype(dtype))

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

    def _as_size(self, size, dtype: str | None = None) -> Size:
        size = size if isinstance(size, Size) else self.size(size)
        return size if dtype is None else self.any_size.size_at(size.prefix, check_dtype(dtype))

    def layer_table(self, size, dtype: str | None = None) -> pd.DataFrame:
        """Per module type: layers, full rank, mean kept rank (and %), layers dense vs low-rank (in
        `dtype`, else the size's own format)."""
        cells = pd.DataFrame(list(self._layer_cells(self._as_size(size, dtype))),
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

    def rank_heatmap(self, size, dtype: str | None = None) -> dict:
        """Kept-rank fraction as a matrix [blocks × module types] (+ ranks and dense flags in `dtype`)."""
        cells = list(self._layer_cells(self._as_size(size, dtype)))
        blocks = sorted({c[0] for c in cells})
        types = list(dict.fromkeys(c[1] for c in cells))
        shape = (len(blocks), len(types))
        kept, full = np.zeros(shape, dtype=int), np.ones(shape, dtype=int)
        dense = np.zeros(shape, dtype=bool)
        for b, t, r, k, d in cells:
            i, j = blocks.index(b), types.index(t)
            kept[i, j], full[i, j], dense[i, j] = r, k, d
        return dict(blocks=blocks, types=types, fraction=kept / full, kept=kept, full=full, dense=dense)

    # -- chat ---------------------------------------------------------------------------------
    def _chat_ids(self, history, message: str, max_new_tokens: int):
        """Prompt ids through the chat template (oldest turns dropped to fit the context and the
        server's cap of public.limits().chat_tokens: the history comes from the client and may be forged).

        The work is bounded before any tokenizing: at most limits().chat_messages messages are
        accepted (counted, not templated), and of those only the newest that can fit are templated at
        all (≤ budget // 2 messages, ≤ 16 characters per token). The template's own tokens count
        towards the budget: how many of those newest turns fit is found by bisection over the number
        kept, so a long history costs a dozen templatings, not one per dropped turn."""
        raw = check_message_count(history)  # cheap: counted before anything is read or templated
        lim = limits()
        messages = [dict(role=m["role"], content=message_text(m.get("content")))
                    for m in raw if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
        messages = [m for m in messages if m["content"]]
        check_history(messages)
        limit = int(getattr(self.any_size.base.config, "max_position_embeddings", 2048) or 2048)
        budget = max(min(limit - max_new_tokens, lim.chat_tokens), 8)
        kept, chars = [], len(message)  # newest first, by characters (a token holds at most ~16)
        for m in reversed(messages):
            chars += len(m["content"])
            if chars > 16 * budget or len(kept) >= budget // 2:
                break
            kept.insert(0, m)
        newest = dict(role="user", content=message)

        def encode(turns):
            msgs = turns + [newest]
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                          return_tensors="pt", return_dict=True)["input_ids"]
            return self.tokenizer("\n".join(m["content"] for m in msgs), return_tensors="pt").input_ids

        ids = encode(kept)
        if ids.shape[1] <= budget:
            return ids, len(kept) < len(messages)
        lo, hi, fit = 0, len(kept) - 1, None  # the most newest turns that fit: bisection on the count
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = encode(kept[len(kept) - mid:] if mid else [])
            if trial.shape[1] <= budget:
                lo, fit = mid + 1, trial
            else:
                hi = mid - 1
        if fit is not None:
            return fit, True
        alone = encode([]) if kept else ids  # the message alone is too long: keep its end
        return alone[:, -budget:], True

    def start_chat(self, ratio, history, message, max_new_tokens=128, repetition_penalty=REPETITION_PENALTY,
                   dtype: str = "float32") -> Generation:
        """Starts a streamed, greedy chat reply at a size; returns the running Generation."""
        message = clean_prompt(message)
        max_new_tokens = check_int(max_new_tokens, 1, MAX_NEW_TOKENS, "max_new_tokens")
        repetition_penalty = _float_in(repetition_penalty, 1.0, 2.0, "repetition_penalty")
        model = self.model(ratio, dtype)
        limit = int(getattr(self.any_size.base.config, "max_position_embeddings", 2048) or 2048)
        max_new_tokens = min(max_new_tokens, max(limit - 8, 1))
        ids, truncated = self._chat_ids(history, message, max_new_tokens)
        return Generation(model, self.tokenizer, ids, max_new_tokens, repetition_penalty, truncated)

    def stream_chat(self, ratio, history, message, max_new_tokens=128, repetition_penalty=REPETITION_PENALTY,
                    dtype: str = "float32"):
        """Yields snapshots dict(text, tokens, first_token_s, tokens_per_s, done, ...) as text streams
        (and with every new token, even one that shows no text, so a consumer regains control often).

        Closing the generator (a cancelled request, a client that went away: Gradio closes a streaming
        handler's generator) stops the generation thread at its next token (Generation's stopping
        criterion).
        """
        size_ratio = self.size(ratio).size_ratio
        gen = self.start_chat(ratio, history, message, max_new_tokens, repetition_penalty, dtype)
        try:
            while not gen.done:
                if gen.poll(0.05):
                    yield gen.snapshot(size_ratio)
        finally:
            gen.stop()

    def compare(self, ratio_a, ratio_b, message, history_a=None, history_b=None, max_new_tokens=128,
                repetition_penalty=REPETITION_PENALTY, dtype: str = "float32", other: "Explorer | None" = None):
        """Streams two sizes at once (B from `other`, another artifact, when given); yields
        (snapshot_a, snapshot_b) whenever either changes."""
        other = other or self
        ra, rb = self.size(ratio_a).size_ratio, other.size(ratio_b).size_ratio
        a = self.start_chat(ratio_a, history_a, message, max_new_tokens, repetition_penalty, dtype)
        try:
            b = other.start_chat(ratio_b, history_b, message, max_new_tokens, repetition_penalty, dtype)
        except BaseException:
            a.stop()
            raise
        try:
            while not (a.done and b.done):
                changed = a.poll(0.03) | b.poll(0.03)
                if changed:
                    yield a.snapshot(ra), b.snapshot(rb)
        finally:
            a.stop()
            b.stop()

    def sweep(self, ratios, message, max_new_tokens=64, repetition_penalty=REPETITION_PENALTY, dtype: str = "float32"):
        """One prompt answered at many sizes, one size after another (greedy, so the replies differ
        only by size): yields the list of snapshots so far (the last one still streaming)."""
        done = []
        for ratio in ratios:
            snap = None
            for snap in self.stream_chat(ratio, [], message, max_new_tokens, repetition_penalty, dtype):
                yield done + [snap]
            if snap is not None:
                done.append(snap)

    # -- measurements -------------------------------------------------------------------------
    def _eval_windows(self, data: str, seq_len: int) -> torch.Tensor:
        key = (data, seq_len)
        with self._lock:
            cached = self._windows.get(key)
        if cached is None:  # a visitor names only offered texts and their own uploads (public.py)
            cached = token_windows(self.tokenizer, load_text(check_data(data)), seq_len)
            with self._lock:
                self._windows[key] = cached
        return cached

    def _row(self, kind: str, size: Size, dtype: str, **values) -> dict:
        """One results row. Rows belong to the caller (the app keeps them per session)."""
        row = dict(time=datetime.datetime.now().isoformat(sep=" ", timespec="seconds"), kind=kind,
                   size_ratio=round(size.size_ratio, 5), dtype=dtype)
        row.update(values)  # what was measured comes before the size's bookkeeping
        sized = self.any_size.size_at(size.prefix, check_dtype(dtype))
        row.update(params=sized.params, gb=sized.gigabytes, artifact=self.name)
        return row

    def measure_perplexity(self, ratio, data: str = "corpus:heldout", windows: int = 8, seq_len: int = 256,
                           dtype: str = "float32", batch_size: int = 4, on_progress=None,
                           should_stop=None) -> dict:
        """Perplexity of one size on `windows` non-overlapping windows of `data`; adds a results row.

        Raises Cancelled when should_stop() turns True.
        """
        windows = check_int(windows, 1, limits().perplexity_windows, "windows")
        seq_len = check_int(seq_len, 8, 8192, "seq_len")
        size = self.size(ratio)
        limit = int(getattr(self.any_size.base.config, "max_position_embeddings", seq_len) or seq_len)
        if seq_len > limit:
            raise ValueError(f"seq_len {seq_len} exceeds the model's context of {limit} tokens")
        all_windows = self._eval_windows(data, seq_len)
        picked = all_windows[:windows]
        model = self.model(ratio, dtype)
        result = perplexity(model, picked, batch_size, on_progress, should_stop)
        low, high = spread(result["perplexity"], result["nll_std"], result["windows"])
        metric = f"ppl_{data.removeprefix('corpus:')}"  # the curve's column of the same text, if any
        curve = curve_at(self.curve, size.size_ratio, metric)
        return self._row("perplexity", size, dtype, data=data, windows=result["windows"],
                         seq_len=seq_len, tokens=result["tokens"], perplexity=result["perplexity"],
                         ppl_low=low, ppl_high=high, nll_std=result["nll_std"],
                         curve_perplexity=curve["value"] if curve["metric"] == metric else None,
                         seconds=round(result["seconds"], 2), tokens_per_s=round(result["tokens_per_s"], 1))

    def measure_lm_eval(self, ratio, tasks, limit=None, batch_size: int = 8, dtype: str = "float32",
                        should_stop=None, on_progress=None) -> dict:
        """lm-eval tasks on one size (acip_core.evaluation.lmeval); adds a results row with every metric."""
        from acip_core.evaluation.lmeval import run_lm_eval  # lazy: lm-eval is a heavy import

        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",")]
        tasks = [t for t in (tasks or []) if t]
        if not tasks:
            raise ValueError("choose at least one lm-eval task")
        lim = limits()  # the heavy slot is shared: bounded work in public mode (public.py)
        if limit is not None or lim.public:
            limit = check_int(lim.lm_eval_items if limit is None else limit, 1, lim.lm_eval_items, "limit")
        batch_size = check_int(batch_size, 1, 512, "batch_size")
        size = self.size(ratio)
        model = GATE.wrap(self.any_size.materialize(size, dtype))  # its own tree: lm-eval's hooks stay on it
        start = time.perf_counter()
        result = run_lm_eval(model, self.tokenizer, tasks, limit, batch_size, should_stop, on_progress)
        seconds = time.perf_counter() - start
        metrics = _flatten_metrics(result)
        return self._row("lm-eval", size, dtype, data=",".join(tasks), limit=limit,
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

    # -- export -------------------------------------------------------------------------------
    def export(self, ratio, out: str | Path, dense: bool = False, dtype: str = "float32",
               zip_path: str | Path | None = None, measured=()) -> dict:
        """Writes the size to `out` (low-rank with remote code, or dense in the base architecture)."""
        from acip_core.export import sized as exporter  # lazy: written alongside

        dtype = check_dtype(dtype)
        size = self.any_size.size_at(self.size(ratio).prefix, dtype)
        out = Path(out)
        start = time.perf_counter()
        if dense:
            exporter.export_dense(self.any_size, size, out, dtype, self._card(size, measured))
        else:
            exporter.export_lowrank(self.any_size, size, out, dtype, self._card(size, measured))
        info = dict(folder=str(out), kind="dense" if dense else "low-rank", dtype=dtype,
                    size_ratio=size.size_ratio, params=exporter.saved_params(out),
                    bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()))
        if zip_path is not None:
            info["zip"] = str(exporter.zip_folder(out, zip_path) or zip_path)
        info["seconds"] = time.perf_counter() - start
        return info

    def _card(self, size: Size, measured=()) -> dict:
        """What the model card states (export.model_card keys): the latest perplexity measured at
        this size in this session (rows from measure_perplexity), and the original's on the same
        text when measured too; else what the artifact's curve says at this size."""
        from acip_core.export.sized import card_from_curve

        meta = self.any_size.meta
        card = dict(base_model=meta.model.source if meta else None, artifact=self.name)
        ppl = pd.DataFrame([r for r in measured if r.get("kind") == "perplexity"
                            and r.get("artifact", self.name) == self.name])
        here = ppl[ppl.size_ratio == round(size.size_ratio, 5)] if len(ppl) else ppl
        if not len(here):
            return dict(card_from_curve(self.curve, size.size_ratio), **card)
        last = here.iloc[-1]
        card.update(perplexity=float(last.perplexity), perplexity_data=str(last.data),
                    perplexity_tokens=int(last.tokens))
        base = ppl[(ppl.size_ratio == 1.0) & (ppl.data == last.data) & (ppl.tokens == last.tokens)]
        if len(base):
            card["base_perplexity"] = float(base.iloc[-1].perplexity)
        return card

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
        from acip_core.artifacts.tuned import tuned_sizes

        if self.parent_folder is None or not (Path(self.parent_folder) / "acip.json").is_file():
            return []
        found = tuned_sizes(self.parent_folder, extra)
        for t in found:  # GB in the format it was tuned in (the GB view's x)
            t["gb"] = self.any_size.size_at(self.any_size.size_for_ratio(t["size_ratio"]).prefix,
                                            t["format"]).gigabytes
        return found

    def budget_answer(self, gigabytes) -> dict:
        """The budget's answer in every format the app offers, by the one ranking (curve.rank_for_budget,
        the CLI's `size --budget-gb` too): rows (one per format: dtype, fits, the size's summary,
        perplexity, ranked; smallest_gb where it does not fit), the best (best=True in its row; by the
        ranking rule among formats measured on comparable windows; the largest size that fits where
        nothing fitting was measured, with measured=False), eval_set, windows, rule (in words) and
        smallest_measured (size_ratio, format, gb of the smallest measured model)."""
        budget = _budget(gigabytes)
        ranking = rank_for_budget(self.any_size, self.curve, budget, None, DTYPE_CHOICES)
        rows = []
        for r in ranking["rows"]:
            if not r["fits"]:
                rows.append(dict(dtype=r["format"], fits=False, smallest_gb=r["smallest_gb"]))
                continue
            rows.append(dict(self._budget_row(r["size"], r["format"], budget), fits=True,
                             perplexity=r["perplexity"], ranked=r["ranked"]))
        fitting = [r for r in rows if r["fits"]]
        measured = ranking["best"] is not None
        if measured:
            best = next(r for r in fitting if r["dtype"] == ranking["best"]["format"])
        elif fitting:  # nothing fitting was measured: the largest size, said to be unmeasured
            best = max(fitting, key=lambda r: (r["size_ratio"], -DTYPE_CHOICES.index(r["dtype"])))
        else:
            best = None
        if best is not None:
            best["best"] = True
        return dict(rows=rows, best=best, measured=measured, eval_set=ranking["eval_set"],
                    windows=ranking["windows"], rule=rule_text(ranking),
                    smallest_measured=ranking["smallest_measured"])

    def fit_budget_every_dtype(self, gigabytes) -> list[dict]:
        """The rows of `budget_answer` (one per format; the best has best=True)."""
        return self.budget_answer(gigabytes)["rows"]


def _budget(gigabytes) -> float:
    """A memory budget in GB as a positive finite number, or a ValueError that names it."""
    try:
        budget = float(gigabytes)
    except (TypeError, ValueError):
        raise ValueError(f"the budget must be a number of GB, got {gigabytes!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"the budget must be a positive number of GB, got {gigabytes!r}")
    return budget


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


__all__ = ["Explorer", "Generation", "Cancelled", "check_ratio", "clean_prompt",
           "DTYPE_CHOICES", "MAX_PROMPT_CHARS"]

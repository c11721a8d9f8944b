"""Chat for the Explorer: the bounds a chat history from the page must keep, one streamed greedy
generation in its own thread, and the chat verbs (one size, two sizes side by side, a sweep over sizes).

The history comes from the client and may be forged: it is counted before it is read, and only the
newest turns that can fit are templated (docs/ARCHITECTURE.md, "Public mode").
"""

from __future__ import annotations

import re
import threading
import time

import torch

from acip_core.evaluation.evaluate import REPETITION_PENALTY
from acip_core.serving.checks import check_float, check_int
from acip_core.serving.public import limits
from acip_core.sources.models import context_length

MAX_PROMPT_CHARS = 8000
MAX_NEW_TOKENS = 1024
MAX_HISTORY_CHARS = 200_000  # a longer chat history was not sent by the page; refused
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")  # keeps \t \n \r


# -- what a chat request may hold -----------------------------------------------------------------
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


# -- the chat verbs of an Explorer --------------------------------------------------------------
class ChatMixin:
    """Chat, compare and sweep for the Explorer (serving/explorer.py), which provides `any_size`,
    `tokenizer`, `size(ratio)` and `model(ratio, format)`."""

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
        limit = context_length(self.any_size.base.config) or 2048
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
                   format: str = "float32") -> Generation:
        """Starts a streamed, greedy chat reply at a size; returns the running Generation."""
        message = clean_prompt(message)
        max_new_tokens = check_int(max_new_tokens, 1, MAX_NEW_TOKENS, "max_new_tokens")
        repetition_penalty = check_float(repetition_penalty, 1.0, 2.0, "repetition_penalty")
        model = self.model(ratio, format)
        limit = context_length(self.any_size.base.config) or 2048
        max_new_tokens = min(max_new_tokens, max(limit - 8, 1))
        ids, truncated = self._chat_ids(history, message, max_new_tokens)
        return Generation(model, self.tokenizer, ids, max_new_tokens, repetition_penalty, truncated)

    def stream_chat(self, ratio, history, message, max_new_tokens=128, repetition_penalty=REPETITION_PENALTY,
                    format: str = "float32"):
        """Yields snapshots dict(text, tokens, first_token_s, tokens_per_s, done, ...) as text streams
        (and with every new token, even one that shows no text, so a consumer regains control often).

        Closing the generator (a cancelled request, a client that went away: Gradio closes a streaming
        handler's generator) stops the generation thread at its next token (Generation's stopping
        criterion).
        """
        size_ratio = self.size(ratio).size_ratio
        gen = self.start_chat(ratio, history, message, max_new_tokens, repetition_penalty, format)
        try:
            while not gen.done:
                if gen.poll(0.05):
                    yield gen.snapshot(size_ratio)
        finally:
            gen.stop()

    def compare(self, ratio_a, ratio_b, message, history_a=None, history_b=None, max_new_tokens=128,
                repetition_penalty=REPETITION_PENALTY, format: str = "float32", other: "ChatMixin | None" = None):
        """Streams two sizes at once (B from `other`, another artifact, when given); yields
        (snapshot_a, snapshot_b) whenever either changes."""
        other = other or self
        ra, rb = self.size(ratio_a).size_ratio, other.size(ratio_b).size_ratio
        a = self.start_chat(ratio_a, history_a, message, max_new_tokens, repetition_penalty, format)
        try:
            b = other.start_chat(ratio_b, history_b, message, max_new_tokens, repetition_penalty, format)
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

    def sweep(self, ratios, message, max_new_tokens=64, repetition_penalty=REPETITION_PENALTY, format: str = "float32"):
        """One prompt answered at many sizes, one size after another (greedy, so the replies differ
        only by size): yields the list of snapshots so far (the last one still streaming)."""
        done = []
        for ratio in ratios:
            snap = None
            for snap in self.stream_chat(ratio, [], message, max_new_tokens, repetition_penalty, format):
                yield done + [snap]
            if snap is not None:
                done.append(snap)

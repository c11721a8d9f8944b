"""Perplexity over non-overlapping windows, and a small text-generation helper."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


# The one repetition penalty of every greedy reply: the CLI's `generate`, the app's chat and sweep, and
# the exports' generation_config.json, so a size answers the same everywhere.
REPETITION_PENALTY = 1.15


class Cancelled(RuntimeError):
    """Raised when a long job is asked to stop."""


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, on_progress=None,
               should_stop=None) -> dict:
    """exp(mean window NLL) as the paper computes it (every window weighs the same).

    Args:
        windows: token ids [n, L], one independent context each.
        on_progress: called as on_progress(done_windows, total_windows).
        should_stop: a callable; when it returns True the evaluation raises Cancelled.
    Returns:
        dict(perplexity, nll, nll_std, windows, tokens, seconds, tokens_per_s)
    """
    device = next(model.parameters()).device
    start, losses = time.perf_counter(), []
    for i in range(0, len(windows), batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("perplexity evaluation cancelled")
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()  # [b, L-1, V]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)  # [b]
        losses.extend(nll.tolist())
        if on_progress:
            on_progress(min(i + batch_size, len(windows)), len(windows))
    seconds = time.perf_counter() - start
    mean = sum(losses) / len(losses)
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / max(len(losses) - 1, 1))
    tokens = windows.numel()
    return dict(perplexity=math.exp(mean), nll=mean, nll_std=std, windows=len(losses),
                tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds)


def chat_input_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids for a prompt, through the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True,
                  repetition_penalty: float = REPETITION_PENALTY, streamer=None) -> str:
    """Greedy continuation of `prompt` (deterministic, so two sizes can be compared)."""
    ids = chat_input_ids(tokenizer, prompt, chat).to(next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         streamer=streamer)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

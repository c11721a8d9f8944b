"""Sharing the cores: the compute gate every materialized model's forward pass goes through (off by
default; ACIP_COMPUTE_SLOTS=N turns it on). The Explorer's models and lm-eval's own copy are wrapped
by it (serving/explorer.py, serving/measure.py)."""

from __future__ import annotations

import functools
import os
import threading


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

        @functools.wraps(inner)  # its signature: generate() passes logits_to_keep only where forward takes it
        def forward(*args, **kwargs):
            with sem:
                return inner(*args, **kwargs)

        model.forward, model._acip_gated = forward, True
        return model


GATE = ComputeGate()

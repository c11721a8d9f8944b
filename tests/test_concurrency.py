"""Concurrent requests take turns on the cores (explorer.ComputeGate): forward passes never overlap."""

import threading
import time

import torch

from acip_core.serving.gate import ComputeGate


class _Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.running, self.most, self.calls = 0, 0, 0
        self.lock = threading.Lock()

    def forward(self, x):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls += 1
        time.sleep(0.01)
        with self.lock:
            self.running -= 1
        return x


def _hammer(model, threads=4, calls=10):
    def work():
        for _ in range(calls):
            model(torch.zeros(1))
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def test_forward_passes_take_turns_with_one_slot():
    model = ComputeGate(1).wrap(_Slow())
    _hammer(model)
    assert model.calls == 40 and model.most == 1
    assert ComputeGate(1).wrap(model) is model  # wrapped once


def test_the_gate_can_be_turned_off_or_widened():
    free = ComputeGate(0).wrap(_Slow())
    _hammer(free)
    assert free.most > 1  # no gate: passes overlap (what oversubscribed the cores)
    two = ComputeGate(2).wrap(_Slow())
    _hammer(two)
    assert two.most <= 2


def test_a_gated_model_keeps_its_forward_signature(tiny_llama):
    """generate() passes logits_to_keep only to a forward that names it: behind the gate a prefill
    still computes the head for the last token only."""
    import inspect

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ComputeGate(1).wrap(model)
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
    assert model._supports_logits_to_keep()

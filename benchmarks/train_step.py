"""Time of one fine-tuning step with the chunked vocabulary loss (train.vocab_loss, as shipped)
against torch's own composition (cross_entropy + log_softmax KL over the whole [tokens, vocab]
tensor, the loss before 2026-11-26), same model, same batches, alternating, in one process.

    .venv/bin/python benchmarks/train_step.py [--size-ratio 0.8] [--objective lm+kd] [--precision auto|fp32]
Run it on an idle machine. Prints each variant's median step time and its losses (they must agree).
--precision auto is what `finetune` does: bf16 autocast where the CPU multiplies bf16 natively.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.training import train  # noqa: E402
from acip_core.artifacts.artifact import load_artifact  # noqa: E402
from acip_core.evaluation.bench import cpu_flags  # noqa: E402
from acip_core.sources.data import BatchStream, load_text, token_windows  # noqa: E402
from acip_core.training.finetune import tunable_model  # noqa: E402
from acip_core.sources.models import load_base  # noqa: E402
from acip_core.artifacts.open import any_size_from  # noqa: E402
from acip_core.training.score import autocast_dtype  # noqa: E402


def torch_composition(logits, targets, teacher_logits=None, temperature=1.0, lm=True, kd=False):
    """The reference: the same loss from torch's whole-tensor ops (autograd forms the gradient)."""
    v = logits.shape[-1]
    nll = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1))
    kl = torch.zeros(())
    if kd:
        log_s = F.log_softmax(logits.float() / temperature, -1)
        log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
        kl = temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return (nll if lm else 0) + (kl if kd else 0), nll.detach(), kl.detach()


def main():
    p = argparse.ArgumentParser()
    common.add_artifact(p)
    p.add_argument("--size-ratio", type=float, default=0.8)
    p.add_argument("--objective", default="lm+kd")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = p.parse_args()
    torch.set_num_threads(2)
    parent = load_artifact(args.artifact)
    base, tokenizer = load_base(parent.meta.model.source)
    any_size = any_size_from(parent, base, tokenizer)
    student, layers = tunable_model(any_size, any_size.size_for_ratio(args.size_ratio), parent.adapters, 16.0, 0.05)
    teacher = any_size.materialize(any_size.full_size()) if "kd" in args.objective else None
    params = [getattr(l, k) for l in layers.values() for k in ("lora_A", "lora_B")]
    stream = BatchStream(token_windows(tokenizer, load_text("corpus:broad"), 256), 4, 42)
    shipped = train.vocab_loss
    variants = {"chunked (shipped)": shipped, "torch composition": torch_composition}
    times = {k: [] for k in variants}
    amp = autocast_dtype(args.precision, torch.device("cpu"))
    print(f"cpu: {cpu_flags()}, {torch.get_num_threads()} threads, size {args.size_ratio}, {args.objective}, "
          f"batch 4 x 256, autocast {amp}")
    student.train()
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fn in variants.items():
            train.vocab_loss = fn
            torch.manual_seed(r)
            loss_fn = train.objective(args.objective, student, teacher)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss, metrics = loss_fn(stream.batch(r))
            for q in params:
                q.grad = None
            loss.backward()
            elapsed = time.perf_counter() - start
            if r:
                times[name].append(elapsed)
            print(f"round {r} {name}: {elapsed:.2f} s, loss {loss.item():.5f}", flush=True)
    train.vocab_loss = shipped
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t):.2f} s a step (forward + backward, no optimizer)")


if __name__ == "__main__":
    main()

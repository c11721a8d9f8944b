"""Fine-tune one chosen size (paper §3.3): continue training ACIP's LoRA at that size, factors frozen.

The size is materialized as the explorer does (views of the shared factors) except that each
factorized layer keeps its LoRA apart and trainable (TunableLowRank); dense layers run the original
weight, as at materialization (App. D.3). As in the paper the adapters start from the scoring run's
and the optimizer state starts fresh. The objective is lm (next-token NLL), kd (distillation from
the original, which is the full size of the same any-size model: the same tensors, no second copy)
or lm+kd; the run is the shared training loop (train.py): checkpoints, exact resume, log, and
torchrun / accelerate launch through distributed.py. The result is a tuned size (tuned.py).
"""

from __future__ import annotations

import datetime
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .artifact import load_artifact
from .data import BatchStream, load_text, token_windows
from .evaluate import perplexity
from .formats import Format
from .materialize import AnySizeModel, Size, _clone_tree
from .models import load_base
from .score import autocast_dtype
from .train import OBJECTIVES, StepHook, objective, remove_checkpoint, train_loop
from .tuned import TUNED_FILE, TunedSize, load_tuned, parent_checksum, parent_reference, save_tuned

log = logging.getLogger(__name__)
EVAL_SETS = {"heldout": "corpus:heldout", "domain": "corpus:domain"}


@dataclass
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4  # AdamW on the LoRA (the scoring run's post-tuning used 1.5e-4)
    objective: str = "kd"
    temperature: float = 1.0
    lora_dropout: float = 0.05
    seed: int = 42
    checkpoint_every: int = 25
    precision: str = "auto"  # auto | bf16 | fp32, as in scoring

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ValueError(f"{name} must be in [1, 1000000]")
        if not 2 <= self.seq_len <= 8192:
            raise ValueError("seq_len must be in [2, 8192]")
        if not 0 < self.lr <= 1.0 or not 0 < self.temperature <= 100 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lr in (0, 1], temperature in (0, 100] and lora_dropout in [0, 1) are required")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("precision must be auto, bf16 or fp32")


class TunableLowRank(nn.Module):
    """A materialized factorized layer whose LoRA is kept apart and trained:
    y = up_tᵀ·(down·x) + b + (α/r)·B·A·dropout(x), with down/up_t views of the frozen shared factors."""

    def __init__(self, down, up_t, bias, lora_A, lora_B, scaling: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = down.shape[1], up_t.shape[1]
        self.down, self.up_t, self.bias = down, up_t, bias  # plain attributes: never trained
        self.lora_A = nn.Parameter(lora_A.detach().float().clone())  # [r, in]
        self.lora_B = nn.Parameter(lora_B.detach().float().clone())  # [out, r]
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = F.linear(F.linear(x, self.down), self.up_t.t(), self.bias)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


def tunable_model(any_size: AnySizeModel, size: Size, adapters: dict, lora_alpha: float, dropout: float):
    """The size as a trainable module tree over the shared tensors; returns (model, {fqn: layer})."""
    base, factors = any_size._family(Format())  # the float32 family: factors in score order
    rank = any_size.lora_rank
    if not rank:
        raise ValueError("this artifact has no LoRA adapters to fine-tune")
    swap, layers = {}, {}
    for n in any_size.targets:
        original, r = base.get_submodule(n), int(size.ranks[n])
        if any_size.shapes[n].runs_dense(r, rank):
            continue  # the original weight, no LoRA (App. D.3)
        down, up_t = factors[n]
        layers[n] = TunableLowRank(down[rank:rank + r], up_t[rank:rank + r], original.bias,
                                   adapters[f"{n}.lora_A"], adapters[f"{n}.lora_B"], lora_alpha / rank, dropout)
        swap[id(original)] = layers[n]
    if not layers:
        raise ValueError(f"no layer is factorized at size {size.size_ratio:.3f} (every one runs its original "
                         "weight): nothing to fine-tune; choose a smaller size")
    for p in base.parameters():  # shared with the base: frozen (the explorer never trains them)
        p.requires_grad_(False)
    return _clone_tree(base, swap), layers


class FinetuneHook(StepHook):
    def after_step(self, step: int) -> dict:
        return dict(phase="done" if self.done(step) else "finetune", of=self.steps)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_finetune(artifact_folder: str | Path, size_ratio: float, data: str, out: str | Path,
                 cfg: FinetuneConfig | None = None, resume: bool = False, on_step=None, should_stop=None,
                 eval_sets: dict | None = None, eval_windows: int = 32, dist=None) -> TunedSize | None:
    """Fine-tunes the size `size_ratio` of an artifact and writes the tuned size to `out`.

    Returns it, or None when should_stop() ended the run early (resume it later). eval_sets
    (name -> source; default heldout and domain) are measured untuned and tuned into tuned.json;
    fine-tuning on one of them is refused, since its figures would then not be held out.
    """
    from .pipeline import RunLock, any_size_from  # (pipeline imports this module lazily too)

    cfg = cfg or FinetuneConfig()
    out = Path(out)
    eval_sets = EVAL_SETS if eval_sets is None else eval_sets
    if data in eval_sets.values():
        raise ValueError(f"{data} is an evaluation set; fine-tune on other text (e.g. corpus:broad)")
    if not 0.0 < float(size_ratio) < 1.0:
        raise ValueError(f"size_ratio must be in (0, 1), got {size_ratio}")
    if resume and (out / TUNED_FILE).exists() and not (out / "checkpoint.json").exists():
        return load_tuned(out)  # that run had finished
    writer = dist is None or dist.rank == 0
    if writer and not resume and (out / TUNED_FILE).exists():
        raise FileExistsError(f"{out} already holds a tuned size; pick another --out (or --resume)")
    lock = RunLock(out) if writer else None
    if lock:
        lock.__enter__()
    try:
        torch.manual_seed(cfg.seed)
        parent = load_artifact(artifact_folder)
        base, tokenizer = load_base(parent.meta["model"]["source"])
        any_size = any_size_from(parent, base, tokenizer)
        size = any_size.size_for_ratio(size_ratio)
        lora = parent.meta.get("lora", {})
        student, layers = tunable_model(any_size, size, parent.adapters, float(lora.get("alpha", 16.0)),
                                        cfg.lora_dropout)
        teacher = any_size.materialize(any_size.full_size()) if cfg.objective != "lm" else None
        params = {f"{n}.{k}": getattr(l, k) for n, l in layers.items() for k in ("lora_A", "lora_B")}
        if dist:
            for p in params.values():
                torch.distributed.broadcast(p.data, src=0)
        windows = token_windows(tokenizer, load_text(data), cfg.seq_len)
        stream = BatchStream(windows, cfg.batch_size, cfg.seed)
        if dist:
            stream = dist.shard_stream(stream)
        device = next(base.parameters()).device
        step, seconds = train_loop(student, params, stream, objective(cfg.objective, student, teacher, cfg.temperature),
                                   FinetuneHook(cfg.steps), cfg, out, resume, on_step, should_stop,
                                   dist.reducer_of(list(params.values())) if dist else None, writer,
                                   autocast_dtype(cfg.precision, device))
        if step < cfg.steps:
            return None
        if not writer:
            return None
        # what is saved (bf16) is what is measured
        adapters = {k: p.detach().to(torch.bfloat16).float() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(adapters[k])
        start = time.perf_counter()
        figures = {}
        untuned = any_size.materialize(size)
        for name, source in eval_sets.items():
            w = token_windows(tokenizer, load_text(source), 256, eval_windows)
            figures[name] = dict(untuned=_ppl(untuned, w), tuned=_ppl(student, w), windows=len(w))
        meta = dict(
            parent=dict(path=parent_reference(Path(artifact_folder), out), checksum=parent_checksum(parent),
                        source=parent.meta["model"]["source"]),
            size=dict(prefix=size.prefix, size_ratio=round(size.size_ratio, 6), params=size.params,
                      target=float(size_ratio), tuned_layers=len(layers)),
            finetune=dict(asdict(cfg), data=data, processes=dist.world_size if dist else 1),
            result=dict(steps=step, seconds=round(seconds, 1), eval_seconds=round(time.perf_counter() - start, 1),
                        peak_rss_mib=round(peak_rss_mib())),
            perplexity=figures,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        save_tuned(out, meta, adapters)
        remove_checkpoint(out)
        return load_tuned(out)
    finally:
        if lock:
            lock.__exit__()


def _ppl(model, windows) -> dict:
    r = perplexity(model.eval(), windows, batch_size=4)
    return dict(perplexity=r["perplexity"], nll=r["nll"], nll_std=r["nll_std"])

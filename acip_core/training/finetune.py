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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from acip_core.artifacts.open import any_size_from, open_folder
from acip_core.artifacts.tuned import TUNED_FILE, TunedSize, load_tuned, parent_checksum, parent_reference, save_tuned
from acip_core.engine.layers import LowRankLinear
from acip_core.engine.materialize import AnySizeModel, Size, _quantized_embeddings
from acip_core.engine.tree import clone_tree
from acip_core.evaluation.evaluate import perplexity
from acip_core.formats.qweight import QuantLinear, QuantLowRankLinear, zero_rows
from acip_core.formats.registry import Format, parse_format
from acip_core.sources.data import BatchStream, load_text, token_windows
from acip_core.sources.models import check_context
from acip_core.training.pipeline import RunLock, finished_run
from acip_core.training.score import autocast_dtype
from acip_core.training.train import (
    OBJECTIVES,
    StepHook,
    objective,
    peak_rss_mib,
    release_memory,
    remove_checkpoint,
    run_identity,
    steps_memory,
    train_loop,
)

log = logging.getLogger(__name__)
EVAL_SETS = {"heldout": "corpus:heldout", "domain": "corpus:domain"}


@dataclass
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 5e-4  # AdamW on the LoRA; 5e-4 beat 2e-4 at 0.5, 0.7 and 0.8 (benchmarks/RESULTS.md)
    objective: str = "lm+kd"  # the best balance of held-out text and an unseen domain there
    temperature: float = 1.0
    lora_dropout: float = 0.05
    seed: int = 42
    checkpoint_every: int = 25
    precision: str = "auto"  # auto | bf16 | fp32, as in scoring
    format: str = "float32"  # the format of the frozen size (a Format key: int4-g32, int8+emb8, …)

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
        self.format = parse_format(self.format).key  # raises on an unknown format


class TunableLowRank(nn.Module):
    """A materialized factorized layer whose LoRA is kept apart and trained:
    y = frozen(x) + (α/r)·B·A·dropout(x), with `frozen` the size's factors without the LoRA rows
    (a LowRankLinear over views of the shared factors, or a QuantLowRankLinear in an int format:
    the QLoRA-style "ACIP → W4A16 → FT" of the paper's Table A4). The LoRA runs in float32."""

    def __init__(self, frozen: nn.Module, lora_A, lora_B, scaling: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = frozen.in_features, frozen.out_features
        self.__dict__["frozen"] = frozen  # not a submodule: never trained, never in state_dict
        self.lora_A = nn.Parameter(lora_A.detach().float().clone())  # [r, in]
        self.lora_B = nn.Parameter(lora_B.detach().float().clone())  # [out, r]
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.frozen(x)
        lora = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (lora * self.scaling).to(y.dtype)


class InFloat32(nn.Module):
    """A frozen quantized module inside a float32 model: its kernel takes bf16 activations (formats.py),
    everything around it runs in float32 (a bf16 GEMM, the LM head's or attention's, is 10-70x slower
    on CPUs without bf16 instructions: benchmarks/RESULTS.md "Fine-tuning a chosen size")."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.__dict__["inner"] = inner  # not a submodule: shared with the format's family, frozen
        self.dtype = dtype
        for k in ("in_features", "out_features", "num_embeddings", "embedding_dim", "padding_idx"):
            if hasattr(inner, k):
                setattr(self, k, getattr(inner, k))

    @property
    def weight(self):  # transformers reads .weight.dtype/.device of the embeddings
        return getattr(self.inner, "weight", None)

    def forward(self, x):
        return self.inner(x.to(self.dtype) if x.is_floating_point() else x).float()


def _frozen_factors(any_size: AnySizeModel, names: list, ranks: dict, format: Format, biases: dict) -> dict:
    """Each layer's kept factors after the LoRA rows, in `format`. Float formats: views of the family's
    factors. Int formats: rows lora..kept of the float32 factors quantized on their own (zero rows
    pad them to the format's rank step), `down` of all layers in one batch (int4: GPTQ with the
    calibration Grams, as the family). Rows of `down` are quantized independently, so its codes are
    the family's; `up`'s groups may differ, so the served size (the family's quantization of all kept
    rows, the tuned LoRA's rows with them) is close to this, not equal: finetune measures the served one."""
    lora = any_size.lora_rank
    if not format.quantized:
        family = any_size._family(format)[1]
        return {n: LowRankLinear(family[n][0][lora:lora + ranks[n]], family[n][1][lora:lora + ranks[n]], biases[n])
                for n in names}
    family, kept = any_size._family(Format())[1], {}
    for n in names:
        keep = format.kept_rank(lora + ranks[n], any_size.shapes[n].padded_rank(lora, format)) - lora
        kept[n] = (family[n][0][lora:lora + keep], family[n][1][lora:lora + keep],
                   -(-keep // format.rank_step) * format.rank_step)  # zero rows: whole groups for the kernel
    grams = any_size.grams(format)
    # int4: the family's balance (on the whole factors), its kept rows applied
    balance = any_size.int4_balances(format, {n: grams[n] for n in names if n in grams})
    balance = {n: c[lora:] for n, c in balance.items()}
    downs = format.pack_many([kept[n][0] for n in names], [grams.get(n) for n in names], [kept[n][2] for n in names])
    del grams
    frozen = {}
    for n, down in zip(names, downs):
        _, up_t, rows = kept[n]
        if n in balance:
            c = balance[n][:up_t.shape[0]]
            down, up_t = down.scale_rows(1 / c), up_t * c[:, None]
        bias = None if biases[n] is None else biases[n].detach().to(format.compute_dtype)
        frozen[n] = InFloat32(QuantLowRankLinear(down, format.pack(zero_rows(up_t, rows).t().contiguous()), bias), format.compute_dtype)
    return frozen


def factorized_targets(any_size: AnySizeModel, size: Size, format: Format) -> list[str]:
    """The target layers that run factorized at `size` in `format` (the others run their original
    weight, which has no LoRA to tune)."""
    rank = any_size.lora_rank
    return [n for n in any_size.targets
            if not any_size.shapes[n].format_bytes(int(size.ranks[n]), rank, format)[1]]


def check_tunable(any_size: AnySizeModel, size: Size, format: Format | str | None = None) -> None:
    """Fine-tuning's rule: a size is tunable when its artifact has LoRA adapters and at least one of
    its layers runs factorized in `format`. ValueError says why not (tunable_model enforces it; the app
    asks it before it launches a run, serving/studio.py)."""
    if not any_size.lora_rank:
        raise ValueError("this artifact has no LoRA adapters to fine-tune")
    if not factorized_targets(any_size, size, parse_format(format or Format())):
        raise ValueError(f"no layer is factorized at size {size.size_ratio:.3f} (every one runs its original "
                         "weight): nothing to fine-tune; choose a smaller size")


def tunable_model(any_size: AnySizeModel, size: Size, adapters: dict, lora_alpha: float, dropout: float,
                  format: Format | None = None):
    """The size in `format` as a trainable module tree over the shared tensors; returns (model, {fqn: layer}).

    Float formats: the format's family tree. Int formats: the float32 tree with every weight of the
    format quantized (dense layers and, with +emb8, the embedding / LM head, as the format's family
    quantizes them; factors: _frozen_factors) and run by its kernel; activations stay float32
    (InFloat32). Nothing of the format's whole family is built: training holds only this size."""
    format = format or Format()
    check_tunable(any_size, size, format)
    base, _ = any_size._family(Format() if format.quantized else format)
    rank = any_size.lora_rank
    swap, factorized = {}, factorized_targets(any_size, size, format)
    for n in any_size.targets:
        original = base.get_submodule(n)
        if n not in factorized and format.quantized:  # the original weight in the format (no LoRA, App. D.3)
            bias = None if original.bias is None else original.bias.detach().to(format.compute_dtype)
            swap[id(original)] = InFloat32(QuantLinear(format.pack(original.weight), bias), format.compute_dtype)
    frozen = _frozen_factors(any_size, factorized, {n: int(size.ranks[n]) for n in factorized}, format,
                             {n: getattr(base.get_submodule(n), "bias", None) for n in factorized})
    layers = {}
    for n in factorized:
        layers[n] = TunableLowRank(frozen[n], adapters[f"{n}.lora_A"], adapters[f"{n}.lora_B"],
                                   lora_alpha / rank, dropout)
        swap[id(base.get_submodule(n))] = layers[n]
    if format.quantized and format.embeddings == "int8":  # the embedding / LM head in int8, as served
        swap.update({k: InFloat32(m, format.compute_dtype) for k, m in _quantized_embeddings(base, base, format).items()})
    for p in base.parameters():  # shared with the base: frozen (the explorer never trains them)
        p.requires_grad_(False)
    return clone_tree(base, swap), layers


class FinetuneHook(StepHook):
    """Fine-tuning's schedule: `steps` steps (the loop logs each step's memory: train.memory_fields)."""

    def after_step(self, step: int) -> dict:
        return dict(phase="done" if self.done(step) else "finetune", of=self.steps)


def run_finetune(artifact_folder: str | Path, size_ratio: float, data: str, out: str | Path,
                 cfg: FinetuneConfig | None = None, resume: bool = False, on_step=None, should_stop=None,
                 eval_sets: dict | None = None, eval_windows: int = 32, dist=None) -> TunedSize | None:
    """Fine-tunes the size `size_ratio` of an artifact and writes the tuned size to `out`.

    Returns it, or None when should_stop() ended the run early (resume it later). eval_sets
    (name -> source; default heldout and domain) are measured untuned and tuned into tuned.json;
    fine-tuning on one of them is refused, since its figures would then not be held out.
    """
    cfg = cfg or FinetuneConfig()
    out = Path(out)
    eval_sets = EVAL_SETS if eval_sets is None else eval_sets
    if data in eval_sets.values():
        raise ValueError(f"{data} is an evaluation set; fine-tune on other text (e.g. corpus:broad)")
    if not 0.0 < float(size_ratio) < 1.0:
        raise ValueError(f"size_ratio must be in (0, 1), got {size_ratio}")
    writer = dist is None or dist.rank == 0
    if finished_run(out, TUNED_FILE, "a tuned size", resume, writer):
        return load_tuned(out)
    lock = RunLock(out) if writer else None
    if lock:
        lock.__enter__()
    try:
        torch.manual_seed(cfg.seed)
        opened = open_folder(artifact_folder)
        if opened.tuned is not None:
            raise ValueError(f"{artifact_folder} is a tuned size: fine-tune its artifact ({opened.artifact.path})")
        parent, any_size = opened.artifact, opened.any_size
        base, tokenizer = any_size.base, any_size.tokenizer
        check_context(base.config, cfg.seq_len)
        size = any_size.size_for_ratio(size_ratio)
        format = parse_format(cfg.format)
        student, layers = tunable_model(any_size, size, parent.adapters, parent.meta.lora.alpha,
                                        cfg.lora_dropout, format)
        teacher = any_size.materialize(any_size.original_size()) if cfg.objective != "lm" else None
        if format.quantized:  # the student holds its own quantized packs: the float32 factors can go
            any_size.release_float32_factors()  # (the untuned size is measured from a fresh copy)
            release_memory()
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
                                   autocast_dtype(cfg.precision, device),
                                   run_identity(cfg, artifact=str(Path(parent.path).resolve()),
                                                size_ratio=float(size_ratio), data=data,
                                                processes=dist.world_size if dist else 1))
        if step < cfg.steps or not writer:
            return None
        training_rss = peak_rss_mib()  # before measuring opens a second copy of the model
        adapters = {k: p.detach() for k, p in params.items()}
        result = dict(steps=step, seconds=round(seconds, 1), peak_rss_mib=round(training_rss), **steps_memory(out))
        meta = dict(
            parent=dict(path=parent_reference(Path(artifact_folder), out), checksum=parent_checksum(parent),
                        source=parent.meta.model.source),
            size=dict(prefix=size.prefix, size_ratio=round(size.size_ratio, 6), params=size.params,
                      target=float(size_ratio), tuned_layers=len(layers)),
            format=format.key,
            finetune=dict(asdict(cfg), data=data, processes=dist.world_size if dist else 1),
            result=result,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        start = time.perf_counter()
        sets = {name: token_windows(tokenizer, load_text(source), 256, eval_windows)
                for name, source in eval_sets.items()}
        del student, teacher, layers, params
        if format.quantized:  # its float32 factors were released: the parent's any-size model again
            any_size = any_size_from(parent, base, tokenizer)
        untuned = any_size.materialize(size, format)
        figures = {name: dict(untuned=_ppl(untuned, w), windows=len(w)) for name, w in sets.items()}
        del untuned, any_size
        save_tuned(out, meta, adapters)  # (bf16) then measured as every command serves it
        served = open_folder(out)
        served, served_size = served.any_size, served.size
        model = served.materialize(served.size_at(served_size.prefix, format), format)
        for name, w in sets.items():
            figures[name]["tuned"] = _ppl(model, w)
        result["eval_seconds"] = round(time.perf_counter() - start, 1)
        save_tuned(out, dict(meta, perplexity=figures), adapters)
        remove_checkpoint(out)
        return load_tuned(out)
    finally:
        if lock:
            lock.__exit__()


def _ppl(model, windows) -> dict:
    r = perplexity(model.eval(), windows, batch_size=4)
    return dict(perplexity=r["perplexity"], nll=r["nll"], nll_std=r["nll_std"])

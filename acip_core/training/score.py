"""The scoring run (paper Step 2): learn which singular values matter, record the pruning order.

loss = NLL (or distillation from the original: `objective`) + λ·Σ_layers ‖ReLU(m̂)‖₁, λ grows
×reg_growth every reg_every steps; AdamW on masks + LoRA; after every step the score map is updated
(Algorithm 1, `update_scores`); stop at size_ratio ≤ stop_ratio, then post-tune the LoRA with masks
frozen. This schedule is ScoringHook, the step hook of the shared training loop (train.py), which
also does checkpoints and exact resume.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from acip_core.engine.layers import ACIPLinear
from acip_core.engine.prune import LayerShape, size_ratio
from acip_core.formats.registry import FAMILIES, Format, parse_format
from acip_core.training import train
from acip_core.training.train import (  # noqa: F401
    CHECKPOINT_GLOB,
    CHECKPOINT_STATE,
    OBJECTIVES,
    StepHook,
    objective,
    remove_checkpoint,
    train_loop,
)

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    """Hyperparameters of a scoring run (defaults: acip-method.md, adapted and measured for CPU)."""
    steps: int = 1400  # max ACIP steps; the run normally stops earlier, at stop_ratio
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 1e-4  # AdamW, masks and LoRA (paper: 5e-5; see README "Scoring defaults")
    reg_init: float = 1e-3  # λ₀
    reg_growth: float = 1.01  # λ ← λ·reg_growth ...
    reg_every: int = 2  # ... every reg_every steps (paper: 4; 2 halves the run on a small model)
    stop_ratio: float = 0.4
    post_tune_steps: int = 150  # LoRA-only steps after the stop (paper: 1000)
    mask_scale: float = 0.02  # c
    lora_rank: int = 32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    seed: int = 42
    checkpoint_every: int = 25
    precision: str = "auto"  # auto (bf16 autocast where supported) | bf16 | fp32
    objective: str = "lm"  # lm (next-token NLL) | kd (distil the original) | lm+kd (train.objective)
    temperature: float = 1.0  # of the kd objective
    base_format: str = "float32"  # int8 / int4-gNN: score on quantized frozen factors (ACIPLinear.quantize_base_)

    def __post_init__(self):
        if not 0.0 < self.stop_ratio < 1.0:
            raise ValueError(f"stop_ratio must be in (0, 1), got {self.stop_ratio}")
        for name in ("steps", "batch_size", "seq_len", "reg_every", "checkpoint_every"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ValueError(f"{name} must be in [1, 1000000], got {getattr(self, name)}")
        if not 0 <= self.post_tune_steps <= 1_000_000:
            raise ValueError(f"post_tune_steps must be in [0, 1000000], got {self.post_tune_steps}")
        # `not a <= x <= b` is also True for NaN: every float setting is checked this way
        if not 0 < self.lr <= 1.0 or not 1.0 <= self.reg_growth <= 2.0 or not 0 <= self.reg_init <= 1e3:
            raise ValueError("lr in (0, 1], reg_growth in [1, 2] and reg_init in [0, 1000] are required, got "
                             f"{self.lr}, {self.reg_growth}, {self.reg_init}")
        if not 0 < self.mask_scale <= 1.0:  # the STE mask divides by it; ≤ 0 pruned everything at once
            raise ValueError(f"mask_scale must be in (0, 1], got {self.mask_scale}")
        if not 1 <= self.lora_rank <= 4096 or not 0 < self.lora_alpha <= 1e4 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_rank in [1, 4096], lora_alpha in (0, 10000] and lora_dropout in [0, 1) are "
                             f"required, got {self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("precision must be auto, bf16 or fp32")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}")
        if not 0.0 < self.temperature <= 100.0:
            raise ValueError("temperature must be in (0, 100]")

        base = parse_format(self.base_format)  # raises on an unknown format
        if (not base.quantized and base != Format()) or base.embeddings != "native" or base.layout != "small":
            quantized = ", ".join(name for name, family in FAMILIES.items() if family.quantized)
            raise ValueError(f"base_format must be float32 or a quantized format ({quantized}; "
                             "bf16 scoring is --precision bf16; "
                             "the embeddings stay as they are; scoring has no sizes, so no layout)")
        if base.quantized and self.objective != "lm":
            raise ValueError(f"objective {self.objective} needs the original's full-precision weights as "
                             "teacher, which a quantized base exists not to hold: use --objective lm")
        self.base_format = base.key


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    acip_steps: int = 0
    post_steps: int = 0
    reg_weight: float = 0.0
    phase: str = "acip"  # acip | post_tune | done
    size_ratio: float = 1.0
    seconds: float = 0.0
    history: list = field(default_factory=list)  # not persisted; the log file is


def update_scores(scores: dict | None, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Paper Algorithm 1: alive → score = mask value; newly pruned → 0; every pruned entry ages by −1."""
    if scores is None:
        scores = {n: m.detach().float().clone() for n, m in masks.items()}
    out = {}
    for n, m in masks.items():
        m, s = m.detach().float(), scores[n].clone()
        alive = m > 0
        s = torch.where(alive, m, torch.where(s >= 0, torch.zeros_like(s), s))
        out[n] = torch.where(s <= 0, s - 1, s)
    return out


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    try:  # CPU: bf16 only where the hardware does it natively (AVX-512 bf16 / AMX)
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except Exception:
        return None


def trainable(layers: dict[str, ACIPLinear]) -> dict[str, torch.nn.Parameter]:
    return {f"{n}.{k}": getattr(l, k) for n, l in layers.items() for k in ("mask", "lora_A", "lora_B")}


def current_ratio(layers: dict[str, ACIPLinear], shapes: dict[str, LayerShape]) -> float:
    return size_ratio(shapes, {n: l.rank for n, l in layers.items()})


class ScoringHook(StepHook):
    """ACIP's schedule as the shared loop's step hook: λ growth, the stop test, the score map
    (Algorithm 1) after every step, then post-tuning the LoRA with masks frozen."""

    def __init__(self, cfg: ScoreConfig, layers: dict[str, ACIPLinear]):
        super().__init__(cfg.steps)
        self.cfg, self.layers = cfg, layers
        self.shapes = {n: LayerShape(l.out_features, l.in_features, l.bias is not None) for n, l in layers.items()}
        self.run = RunState(reg_weight=cfg.reg_init)
        self.scores = None

    def state(self) -> dict:
        return {k: v for k, v in asdict(self.run).items() if k not in ("step", "seconds", "history")}

    def load_state(self, state: dict) -> None:
        self.run = RunState(**{**asdict(self.run), **state})

    def tensors(self) -> dict:
        return self.scores or {}

    def load_tensors(self, tensors: dict) -> None:
        # a checkpoint's tensors come back on the CPU; the masks they are compared with may be on a GPU
        device = next(iter(self.layers.values())).mask.device
        self.scores = {k: v.to(device) for k, v in tensors.items()} if tensors else None

    def begin(self) -> None:
        if self.run.phase == "post_tune":
            self._freeze_masks()

    def done(self, step: int) -> bool:
        return self.run.phase == "done"

    def penalty(self) -> torch.Tensor | float:
        """λ·Σ‖ReLU(m̂)‖₁ (one-sided L1, fp32) while pruning; nothing while post-tuning."""
        if self.run.phase != "acip":
            return 0.0
        return self.run.reg_weight * sum(F.relu(l.mask.float()).sum() for l in self.layers.values())

    def after_step(self, step: int) -> dict:
        state, cfg = self.run, self.cfg
        state.step = step
        if state.phase == "acip":
            state.acip_steps += 1
            if state.acip_steps % cfg.reg_every == 0:
                state.reg_weight *= cfg.reg_growth
            state.size_ratio = current_ratio(self.layers, self.shapes)
            reached = state.size_ratio <= cfg.stop_ratio
            if not (reached and cfg.post_tune_steps):  # the stop batch is not recorded before post-tuning
                self.scores = update_scores(self.scores, {n: l.mask for n, l in self.layers.items()})
            if reached or state.acip_steps >= cfg.steps:
                state.phase = "post_tune" if cfg.post_tune_steps else "done"
                if reached:
                    log.info("stop ratio reached at step %d (size_ratio %.4f)", step, state.size_ratio)
        elif state.phase == "post_tune":
            state.post_steps += 1
            if state.post_steps >= cfg.post_tune_steps:
                state.phase = "done"
        if state.phase == "post_tune":
            self._freeze_masks()
        return dict(phase=state.phase, reg_weight=state.reg_weight, size_ratio=state.size_ratio)

    def _freeze_masks(self) -> None:
        for l in self.layers.values():
            l.mask.requires_grad_(False)


# Checkpoints of a scoring run: the shared loop's, with the schedule as a RunState (train.py).
def save_checkpoint(folder: Path, state: RunState, params, opt, scores) -> None:
    meta = {k: v for k, v in asdict(state).items() if k != "history"}
    train.save_checkpoint(folder, meta, params, opt, scores)


def load_checkpoint(folder: Path, params, opt):
    """Restores params and optimizer state in place; returns (RunState, scores) or None."""
    restored = train.load_checkpoint(folder, params, opt)
    if restored is None:
        return None
    known = {f.name for f in fields(RunState)}  # the checkpoint also names its run ("run": train.run_identity)
    return RunState(**{k: v for k, v in restored[0].items() if k in known}), restored[1] or None


def score_loop(model, layers: dict[str, ACIPLinear], stream, cfg: ScoreConfig, folder: Path,
               resume: bool = False, on_step=None, should_stop=None, reduce_grads=None,
               is_writer: bool = True, teacher=None, identity: dict | None = None):
    """Runs (or resumes) the ACIP loop on a parametrized model; returns (scores, RunState).
    `identity` (train.run_identity): what a resume must match.

    Args:
        stream: a BatchStream; batch(step) gives token ids [B, L].
        on_step: called with a dict (step, phase, loss, nll, reg_weight, size_ratio, seconds).
        should_stop: a callable; True ends the loop after a checkpoint (the run can be resumed).
        reduce_grads: called between backward and optimizer step (all-reduce in distributed runs).
        teacher: the original model (objective kd or lm+kd), sharing the frozen tensors.
    """
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(cfg.precision, device)
    if amp_dtype is not None:  # frozen factors stored in the compute dtype: no per-step casts
        for l in layers.values():
            # (FSDP-sharded factors were cast before sharding; a quantized base holds no float factors)
            if l.U is not None and l.U.dtype != amp_dtype:
                l.weight, l.U, l.Vh = l.weight.to(amp_dtype), l.U.to(amp_dtype), l.Vh.to(amp_dtype)
    hook = ScoringHook(cfg, layers)
    task = objective(cfg.objective, model, teacher, cfg.temperature)

    def loss_fn(ids):
        loss, metrics = task(ids)
        return loss + hook.penalty(), metrics

    step, seconds = train_loop(model, trainable(layers), stream, loss_fn, hook, cfg, folder, resume,
                               on_step, should_stop, reduce_grads, is_writer, amp_dtype, identity)
    hook.run.step, hook.run.seconds = step, seconds
    return hook.scores, hook.run

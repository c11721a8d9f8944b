"""The scoring run (paper Step 2): learn which singular values matter, record the pruning order.

loss = NLL + λ·Σ_layers ‖ReLU(m̂)‖₁, λ grows ×reg_growth every reg_every steps; AdamW on masks + LoRA;
after every step the score map is updated (Algorithm 1, `update_scores`); stop at size_ratio ≤
stop_ratio, then post-tune the LoRA with masks frozen. Batches and dropout are functions of the step
index, and checkpoints hold the full optimizer state, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from .artifact import atomic_write_bytes, _sha
from .layers import ACIPLinear
from .prune import LayerShape, size_ratio

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

    def __post_init__(self):
        if not 0.0 < self.stop_ratio < 1.0:
            raise ValueError(f"stop_ratio must be in (0, 1), got {self.stop_ratio}")
        for name in ("steps", "batch_size", "seq_len", "reg_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.post_tune_steps < 0 or self.lr <= 0 or self.reg_growth < 1.0:
            raise ValueError("post_tune_steps >= 0, lr > 0 and reg_growth >= 1 are required")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("precision must be auto, bf16 or fp32")


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


def train_step(model, layers, ids, state: RunState, cfg: ScoreConfig, opt, amp_dtype, reduce_grads=None):
    """One optimizer step; returns (loss, nll, reg) as floats."""
    torch.manual_seed(cfg.seed * 1_000_003 + state.step)  # dropout is a function of the step
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(input_ids=ids.to(device)).logits[:, :-1]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(device))
    reg = sum(F.relu(l.mask.float()).sum() for l in layers.values())  # one-sided L1, fp32
    loss = nll + state.reg_weight * reg if state.phase == "acip" else nll
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if reduce_grads is not None:
        reduce_grads()
    opt.step()
    return loss.item(), nll.item(), reg.item()


def advance(state: RunState, cfg: ScoreConfig, layers, shapes, scores):
    """Schedule after a step: λ growth, stop test, score update, phase changes. Returns scores."""
    state.step += 1
    if state.phase == "acip":
        state.acip_steps += 1
        if state.acip_steps % cfg.reg_every == 0:
            state.reg_weight *= cfg.reg_growth
        state.size_ratio = current_ratio(layers, shapes)
        reached = state.size_ratio <= cfg.stop_ratio
        if not (reached and cfg.post_tune_steps):  # the stop batch is not recorded before post-tuning
            scores = update_scores(scores, {n: l.mask for n, l in layers.items()})
        if reached or state.acip_steps >= cfg.steps:
            state.phase = "post_tune" if cfg.post_tune_steps else "done"
            if reached:
                log.info("stop ratio reached at step %d (size_ratio %.4f)", state.step, state.size_ratio)
    elif state.phase == "post_tune":
        state.post_steps += 1
        if state.post_steps >= cfg.post_tune_steps:
            state.phase = "done"
    if state.phase == "post_tune":
        for l in layers.values():
            l.mask.requires_grad_(False)
    return scores


# -- checkpoints -------------------------------------------------------------------------------
# checkpoint.json names its tensor file by content hash. Saving writes the new tensor file, then
# swaps checkpoint.json, then deletes the old tensor file: a kill -9 at any moment leaves a json
# whose tensor file exists and matches (two fixed names would leave new tensors beside old state).
CHECKPOINT_STATE = "checkpoint.json"
CHECKPOINT_GLOB = "checkpoint-*.safetensors"


def save_checkpoint(folder: Path, state: RunState, params, opt, scores) -> None:
    tensors = {f"param/{k}": p.detach() for k, p in params.items()}
    for k, p in params.items():
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in st:
                tensors[f"adam/{k}/{name}"] = st[name].detach().reshape(-1) if name == "step" else st[name]
    tensors.update({f"score/{k}": v for k, v in (scores or {}).items()})
    blob = save({k: v.contiguous().cpu() for k, v in tensors.items()})
    sha = _sha(blob)
    blob_name = f"checkpoint-{sha[:16]}.safetensors"
    atomic_write_bytes(folder / blob_name, blob)
    meta = {k: v for k, v in asdict(state).items() if k != "history"}
    atomic_write_bytes(folder / CHECKPOINT_STATE, json.dumps(dict(meta, tensors=blob_name, sha256=sha)).encode())
    for old in folder.glob(CHECKPOINT_GLOB):
        if old.name != blob_name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path, params, opt):
    """Restores params and optimizer state in place; returns (RunState, scores) or None."""
    meta_path = folder / CHECKPOINT_STATE
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    blob_path = folder / meta.pop("tensors")
    if not blob_path.is_file():
        raise ValueError(f"{blob_path} is missing: the checkpoint cannot be resumed")
    blob = blob_path.read_bytes()
    if _sha(blob) != meta.pop("sha256"):
        raise ValueError(f"{blob_path} is corrupted or truncated (checksum mismatch)")
    tensors = load(blob)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param/{k}"])
            if f"adam/{k}/step" in tensors:
                opt.state[p] = {"step": tensors[f"adam/{k}/step"].reshape(()).clone(),
                                "exp_avg": tensors[f"adam/{k}/exp_avg"].to(p.device),
                                "exp_avg_sq": tensors[f"adam/{k}/exp_avg_sq"].to(p.device)}
    scores = {k[6:]: v for k, v in tensors.items() if k.startswith("score/")} or None
    return RunState(**meta), scores


def score_loop(model, layers: dict[str, ACIPLinear], stream, cfg: ScoreConfig, folder: Path,
               resume: bool = False, on_step=None, should_stop=None, reduce_grads=None,
               is_writer: bool = True):
    """Runs (or resumes) the ACIP loop on a parametrized model; returns (scores, RunState).

    Args:
        stream: a BatchStream; batch(step) gives token ids [B, L].
        on_step: called with a dict (step, phase, loss, nll, reg_weight, size_ratio, seconds).
        should_stop: a callable; True ends the loop after a checkpoint (the run can be resumed).
        reduce_grads: called between backward and optimizer step (all-reduce in distributed runs).
    """
    shapes = {n: LayerShape(l.out_features, l.in_features, l.bias is not None) for n, l in layers.items()}
    params = trainable(layers)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(cfg.precision, device)
    if amp_dtype is not None:  # frozen factors stored in the compute dtype: no per-step casts
        for l in layers.values():
            if l.U.dtype != amp_dtype:  # (FSDP-sharded factors were cast before sharding)
                l.weight, l.U, l.Vh = l.weight.to(amp_dtype), l.U.to(amp_dtype), l.Vh.to(amp_dtype)
    state, scores = RunState(reg_weight=cfg.reg_init), None
    log_path = folder / "log.jsonl"
    if resume:
        restored = load_checkpoint(folder, params, opt)
        if restored:
            state, scores = restored
            log.info("resumed at step %d (phase %s)", state.step, state.phase)
        _truncate_log(log_path, state.step)
    elif is_writer and log_path.exists():
        log_path.unlink()
    if state.phase == "post_tune":
        for l in layers.values():
            l.mask.requires_grad_(False)
    model.train()
    started = time.perf_counter() - state.seconds
    while state.phase != "done":
        loss, nll, _ = train_step(model, layers, stream.batch(state.step), state, cfg, opt, amp_dtype,
                                  reduce_grads)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {state.step}; lower --lr")
        scores = advance(state, cfg, layers, shapes, scores)
        state.seconds = time.perf_counter() - started
        event = dict(step=state.step, phase=state.phase if state.phase != "done" else "done",
                     loss=loss, nll=nll, reg_weight=state.reg_weight, size_ratio=state.size_ratio,
                     seconds=round(state.seconds, 3))
        if is_writer:
            with open(log_path, "a") as f:
                f.write(json.dumps(event) + "\n")
        if on_step:
            on_step(event)
        stop = should_stop is not None and should_stop()
        if is_writer and (state.step % cfg.checkpoint_every == 0 or stop or state.phase == "done"):
            save_checkpoint(folder, state, params, opt, scores)
        if stop:
            log.info("stopped at step %d; resume with --resume", state.step)
            break
    model.eval()
    return scores, state


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT_STATE).unlink(missing_ok=True)  # first: a json never points at nothing
    for blob in folder.glob(CHECKPOINT_GLOB):
        blob.unlink(missing_ok=True)

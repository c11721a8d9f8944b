"""One training loop for every run that trains tensors of a model: scoring (paper Step 2) and
fine-tuning a chosen size (paper §3.3).

A run is three things: the trainable tensors (`params`), a loss function (`loss_fn(ids) -> (loss,
metrics)`) and a step hook (its schedule: what changes after a step, when it is done, what else it
checkpoints). The loop owns what they share: AdamW, autocast, the gradient all-reduce of distributed
runs (`reduce_grads`, from distributed.py), checkpoints and exact resume, the log and stopping on
request. Batches and dropout are functions of the step index and checkpoints hold the full
optimizer state, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load, save

from acip_core.artifacts.artifact import _sha, atomic_write_bytes

log = logging.getLogger(__name__)
OBJECTIVES = ("lm", "kd", "lm+kd")


class StepHook:
    """A run's schedule around the shared loop; this base runs `steps` steps and nothing else."""

    def __init__(self, steps: int):
        self.steps = steps

    def state(self) -> dict:
        """JSON-able schedule state (checkpointed beside step and seconds)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def tensors(self) -> dict[str, torch.Tensor]:
        """Further tensors a checkpoint must hold (the scoring run's score map)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def begin(self) -> None:
        """Called once before the first step of this process (after a resume's restore)."""

    def after_step(self, step: int) -> dict:
        """Called after optimizer step number `step` (1-based); returns fields for the log line."""
        return dict(phase="done" if self.done(step) else "train")

    def done(self, step: int) -> bool:
        return step >= self.steps


# -- memory ------------------------------------------------------------------------------------------
def rss_mib() -> float | None:
    """The resident memory now, MiB (Linux; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * resource.getpagesize() / 2**20)


_PEAK_MIB = [0.0]  # the highest peak seen before the kernel's counter was last reset (reset_step_peak)


def _kernel_peak_mib() -> float:
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step_peak_mib() or 0.0)  # KiB


def peak_rss_mib() -> float:
    """The process's peak resident memory, MiB, since it started (loading, basis, factors, the steps).
    Linux's clear_refs (reset_step_peak) also resets ru_maxrss, so every reset first keeps the peak."""
    return max(_PEAK_MIB[0], _kernel_peak_mib())


def release_memory() -> None:
    """Collects garbage and hands the C heap's free pages back to the OS (glibc's malloc_trim): after
    a model's worth of quantization temporaries is freed, glibc keeps it resident otherwise (measured:
    60 int4 packs of 1536 × 576 left 165 MB that only the trim returned; RESULTS "Scoring variants")."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def reset_step_peak() -> None:
    """Starts a new window for `step_peak_mib` (Linux: writing 5 to /proc/self/clear_refs resets the
    kernel's high-water mark VmHWM to the RSS now; elsewhere nothing, and the peak reads None)."""
    _PEAK_MIB[0] = peak_rss_mib()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def step_peak_mib() -> float | None:
    """The peak resident memory since `reset_step_peak` (VmHWM), MiB; None where unreadable."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024)
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def memory_fields(device: torch.device) -> dict:
    """What a step's log line says about memory: the RSS after it (heap pages freed during the step
    may stay resident: glibc keeps them), the peak RSS within it (`reset_step_peak` at its start:
    what the step really needed) and, on a GPU, the peak allocated since the run's start."""
    fields = dict(rss_mib=rss_mib(), step_peak_mib=step_peak_mib())
    if device.type == "cuda":
        fields["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return fields


def log_rows(path: Path) -> list[dict]:
    """The step rows of a log.jsonl; a line that is not one (torn by a full disk or a power cut) is
    skipped, so it never blocks a resume or the end of a run."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def steps_memory(folder: Path) -> dict:
    """The maxima of a finished run's per-step memory fields (log.jsonl), None where never logged."""
    rows = log_rows(folder / LOG_FILE)
    out = {}
    for key, name in (("rss_mib", "steps_rss_mib"), ("step_peak_mib", "steps_peak_mib"),
                      ("gpu_peak_mib", "gpu_peak_mib")):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[name] = max(values) if values else None
    return out


# -- loss functions ------------------------------------------------------------------------------
# The vocabulary losses run row chunk by row chunk with their gradient computed on the way: over
# 49k logits a token, torch's log_softmax / sub / exp each stream the whole [tokens, vocab] tensor
# through memory; a chunk of a few rows stays in cache and is read a handful of times (a 20-22 %
# shorter lm+kd step, benchmarks/RESULTS.md "Fine-tuning a chosen size", benchmarks/train_step.py).
LOSS_CHUNK_ROWS = 16


class _VocabLoss(torch.autograd.Function):
    """w_lm·NLL(targets) + w_kd·T²·KL(p_teacher ‖ p_student) at temperature T, means per token;
    returns (loss, nll, kd). Only the loss is differentiable: its gradient (per token
    w_lm·(p_s − onehot) + w_kd·T·(p_s,T − p_t,T), over tokens) is formed in forward and kept."""

    @staticmethod
    def forward(ctx, logits, targets, teacher, temperature: float, w_lm: float, w_kd: float):
        rows = logits.reshape(-1, logits.shape[-1])
        n = rows.shape[0]
        grad = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        nll, kd = rows.new_zeros((), dtype=torch.float32), rows.new_zeros((), dtype=torch.float32)
        flat_t = targets.reshape(-1)
        teach = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])
        t = float(temperature)
        for i in range(0, n, LOSS_CHUNK_ROWS):
            s, g = rows[i:i + LOSS_CHUNK_ROWS].float(), grad[i:i + LOSS_CHUNK_ROWS]
            tgt = flat_t[i:i + LOSS_CHUNK_ROWS, None]
            log_p = torch.log_softmax(s, -1)
            nll -= log_p.gather(-1, tgt).sum()
            torch.exp(log_p, out=g)  # p_s
            if teach is not None:
                log_pt = torch.log_softmax(teach[i:i + LOSS_CHUNK_ROWS].float() / t, -1)
                log_ps = log_p if t == 1.0 else torch.log_softmax(s / t, -1)
                p_t = log_pt.exp()
                kd += (p_t * (log_pt - log_ps)).sum()
                if t == 1.0:  # p_s serves both terms
                    g.mul_(w_lm + w_kd).sub_(p_t, alpha=w_kd)
                else:
                    g.mul_(w_lm).add_(log_ps.exp_().sub_(p_t), alpha=w_kd * t)
            else:
                g.mul_(w_lm)
            g.scatter_add_(-1, tgt, torch.full_like(tgt, -w_lm, dtype=g.dtype))
        grad.div_(n)
        nll, kd = nll / n, kd * (t * t) / n
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        ctx.mark_non_differentiable(nll, kd)
        return w_lm * nll + w_kd * kd, nll, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_kd):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None


def vocab_loss(logits, targets, teacher_logits=None, temperature: float = 1.0, lm: bool = True, kd: bool = False):
    """(loss, nll, kd) of next-token logits [..., V] against targets [...] and, with kd, the
    teacher's logits: loss = NLL if lm + T²·KL(p_teacher ‖ p_student) if kd (means per token).

    T² keeps the kd gradient's scale independent of T (Hinton et al. 2015): ∂/∂z_student = T·(p_s − p_t)
    per token; kd is exactly 0 when the logits are equal.
    """
    if kd and teacher_logits is None:
        raise ValueError("kd needs the teacher's logits")
    return _VocabLoss.apply(logits, targets, teacher_logits if kd else None, float(temperature),
                            1.0 if lm else 0.0, 1.0 if kd else 0.0)


def objective(kind: str, model, teacher=None, temperature: float = 1.0):
    """The loss function of `model` for an objective: lm (next-token NLL), kd (distillation from
    `teacher`, the original model) or lm+kd (their sum). Metrics always hold the NLL."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {kind!r}")
    if kind != "lm" and teacher is None:
        raise ValueError(f"objective {kind} needs the original model as teacher")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    parts = kind.split("+")

    def loss_fn(ids: torch.Tensor):
        device = next(model.parameters()).device
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[:, :-1]
        teacher_logits = None
        if "kd" in parts:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits[:, :-1]
        loss, nll, kd = vocab_loss(logits, ids[:, 1:], teacher_logits, temperature, "lm" in parts, "kd" in parts)
        return loss, dict(nll=nll, kd=kd) if "kd" in parts else dict(nll=nll)
    return loss_fn


# -- checkpoints ---------------------------------------------------------------------------------
# checkpoint.json names its tensor file by content hash. Saving writes the new tensor file, then
# swaps checkpoint.json, then deletes the old tensor file: a kill -9 at any moment leaves a json
# whose tensor file exists and matches (two fixed names would leave new tensors beside old state).
CHECKPOINT_STATE = "checkpoint.json"
CHECKPOINT_GLOB = "checkpoint-*.safetensors"
LOG_FILE = "log.jsonl"


def save_checkpoint(folder: Path, meta: dict, params, opt, extra: dict | None = None) -> None:
    """meta: the JSON state (step, seconds, the hook's); extra: the hook's tensors (saved as score/…)."""
    tensors = {f"param/{k}": p.detach() for k, p in params.items()}
    for k, p in params.items():
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in st:
                tensors[f"adam/{k}/{name}"] = st[name].detach().reshape(-1) if name == "step" else st[name]
    tensors.update({f"score/{k}": v for k, v in (extra or {}).items()})
    blob = save({k: v.contiguous().cpu() for k, v in tensors.items()})
    sha = _sha(blob)
    blob_name = f"checkpoint-{sha[:16]}.safetensors"
    atomic_write_bytes(folder / blob_name, blob)
    atomic_write_bytes(folder / CHECKPOINT_STATE, json.dumps(dict(meta, tensors=blob_name, sha256=sha)).encode())
    for old in folder.glob(CHECKPOINT_GLOB):
        if old.name != blob_name:
            old.unlink(missing_ok=True)
    for leftover in folder.glob(".checkpoint*.tmp"):  # a killed save's (atomic_file): never renamed, never
        leftover.unlink(missing_ok=True)               # matched by CHECKPOINT_GLOB (RunLock: no other writer)


def load_checkpoint(folder: Path, params, opt):
    """Restores params and optimizer state in place; returns (meta, extra tensors) or None."""
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
    missing = [k for k in params if f"param/{k}" not in tensors]
    if missing:
        raise ValueError(f"{blob_path} is a checkpoint of another run (it lacks {missing[0]})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param/{k}"])
            if f"adam/{k}/step" in tensors:
                opt.state[p] = {"step": tensors[f"adam/{k}/step"].reshape(()).clone(),
                                "exp_avg": tensors[f"adam/{k}/exp_avg"].to(p.device),
                                "exp_avg_sq": tensors[f"adam/{k}/exp_avg_sq"].to(p.device)}
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("score/")}
    return meta, extra


# settings a resume may change without making it another run: when it stops, how often it saves
RESUMABLE_CHANGES = frozenset({"steps", "post_tune_steps", "checkpoint_every", "stop_ratio"})


def run_identity(cfg, **what) -> dict:
    """What makes a run this run (its sources and every setting its steps depend on), as JSON: kept in
    its checkpoint, so that a resume with other settings is refused instead of mixing two runs."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps(dict(what, **settings), default=str))


def check_same_run(folder: Path, identity: dict | None) -> None:
    """Refuses (ValueError) to resume the checkpoint in `folder` as a run with other settings."""
    path = Path(folder) / CHECKPOINT_STATE
    if identity is None or not path.is_file():
        return
    try:
        saved = json.loads(path.read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return  # load_checkpoint says what is wrong with it
    if not isinstance(saved, dict):
        return  # written before checkpoints named their run
    differ = sorted(k for k in identity.keys() & saved.keys() if identity[k] != saved[k])
    if differ:
        was = ", ".join(f"{k}={saved[k]!r} (now {identity[k]!r})" for k in differ[:4])
        raise ValueError(f"the checkpoint in {folder} is of a run with {was}: resume it with its own settings, "
                         "or start a new run in another folder")


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT_STATE).unlink(missing_ok=True)  # first: a json never points at nothing
    for blob in folder.glob(CHECKPOINT_GLOB):
        blob.unlink(missing_ok=True)


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [json.dumps(row) for row in log_rows(path) if row["step"] <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


# -- the loop --------------------------------------------------------------------------------------
def train_loop(model, params: dict[str, torch.nn.Parameter], stream, loss_fn, hook: StepHook, cfg,
               folder: Path, resume: bool = False, on_step=None, should_stop=None, reduce_grads=None,
               is_writer: bool = True, amp_dtype: torch.dtype | None = None,
               identity: dict | None = None) -> tuple[int, float]:
    """Runs (or resumes) a training run until hook.done() or should_stop(); returns (step, seconds).

    Args:
        params: the trainable tensors by name (the checkpoint's keys); AdamW(lr=cfg.lr) trains them.
        stream: a BatchStream; batch(step) gives token ids [B, L].
        loss_fn: ids -> (loss tensor, dict of metric tensors), run under autocast(amp_dtype).
        cfg: any config with lr, seed and checkpoint_every.
        on_step: called with each log line (a dict: step, loss, the metrics, the hook's fields, seconds).
        should_stop: a callable; True ends the loop after a checkpoint (the run can be resumed).
        reduce_grads: called between backward and optimizer step (all-reduce in distributed runs).
        identity: run_identity(...): saved in each checkpoint; a resume with another one is refused.
    """
    folder = Path(folder)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    step, seconds = 0, 0.0
    log_path = folder / LOG_FILE
    if resume:
        check_same_run(folder, identity)  # before anything is restored
        restored = load_checkpoint(folder, params, opt)
        if restored:
            meta, extra = restored
            meta.pop("run", None)
            step, seconds = int(meta.pop("step")), float(meta.pop("seconds"))
            hook.load_state(meta)
            hook.load_tensors(extra)
            log.info("resumed at step %d", step)
        _truncate_log(log_path, step)
    elif is_writer and log_path.exists():
        log_path.unlink()
    hook.begin()
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter() - seconds
    while not hook.done(step):
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout is a function of the step
        reset_step_peak()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, metrics = loss_fn(stream.batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if reduce_grads is not None:
            reduce_grads()
        opt.step()
        loss = loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr")
        step += 1
        fields = hook.after_step(step)
        seconds = time.perf_counter() - started
        event = dict(step=step, loss=loss, **{k: float(v.detach()) if torch.is_tensor(v) else v for k, v in metrics.items()}, **fields,
                     **memory_fields(device), seconds=round(seconds, 3))
        if is_writer:
            with open(log_path, "a") as f:
                f.write(json.dumps(event) + "\n")
        if on_step:
            on_step(event)
        stop = should_stop is not None and should_stop()
        if is_writer and (step % cfg.checkpoint_every == 0 or stop or hook.done(step)):
            save_checkpoint(folder, dict(step=step, seconds=seconds, **({"run": identity} if identity else {}),
                                         **hook.state()), params, opt, hook.tensors())
        if stop:
            log.info("stopped at step %d; resume with --resume", step)
            break
    model.eval()
    return step, seconds

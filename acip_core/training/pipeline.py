"""Glue from sources to an artifact: run_scoring() (an artifact is opened again by artifacts/open.py)."""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from acip_core.artifacts.artifact import Artifact, load_artifact, save_artifact
from acip_core.artifacts.open import target_fingerprint
from acip_core.engine.basis import Factors, basis_check, basis_for, default_recipe, meta_basis
from acip_core.engine.materialize import AnySizeModel
from acip_core.engine.tree import clone_tree
from acip_core.engine.parametrize import (
    acip_layers,
    parametrize_,
    replace_modules_,
    target_linears,
    target_names,
    train_only_masks_and_lora_,
    weight_share,
)
from acip_core.evaluation.curve import acip_curve
from acip_core.formats.registry import parse_format
from acip_core.sources.data import BatchStream, load_text, token_windows
from acip_core.sources.models import check_context, load_base, pick_device, recorded_source
from acip_core.system.version import versions
from acip_core.training.score import ScoreConfig, autocast_dtype, remove_checkpoint, score_loop
from acip_core.training.train import CHECKPOINT_STATE, release_memory, run_identity, steps_memory

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another live scoring run is writing to the same folder."""


class RunLock:
    """An exclusive lock file (with the owner's pid) on an output folder; a dead owner's lock is taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                except (ValueError, OSError):
                    pid = 0
                if pid and _alive(pid):
                    raise RunLockedError(f"a scoring run (pid {pid}) is already writing to "
                                         f"{self.path.parent}; wait for it, cancel it, or pick another --out")
                self.path.unlink(missing_ok=True)  # stale lock of a killed run
        raise RunLockedError(f"could not lock {self.path.parent}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def finished_run(out: Path, result_file: str, holds: str, resume: bool, writer: bool) -> bool:
    """Whether `out` holds a run that had finished (its result file, no checkpoint left), to return as
    it is on --resume; a new run into a folder holding one, or an unfinished run's checkpoint, is
    refused (FileExistsError: it would be overwritten). Scoring and fine-tuning share it."""
    if resume and (out / result_file).exists() and not (out / CHECKPOINT_STATE).exists():
        return True
    if writer and not resume and (out / result_file).exists():
        raise FileExistsError(f"{out} already holds {holds}; pick another --out (or --resume)")
    if writer and not resume and (out / CHECKPOINT_STATE).exists():
        raise FileExistsError(f"{out} holds the checkpoint of an unfinished run: --resume it, or pick another --out")
    return False


def run_scoring(model_source: str, data: str, out: str | Path, basis_kind: str = "whitened",
                cfg: ScoreConfig | None = None, resume: bool = False, on_step=None, should_stop=None,
                eval_data: str | None = "corpus:heldout", eval_windows: int = 8, curve_sizes=None,
                targets=None, dist=None) -> Artifact | None:
    """Scores `model_source` on `data` and writes the artifact to `out`.

    `targets`: None discovers the layers to compress (parametrize.discover_targets), or names
    (leaf names or FQN suffixes) choose them; what was chosen is logged and written to acip.json.

    Returns the artifact, or None when should_stop() ended the run early (resume it later).
    `dist` (a DistContext) makes this one rank of a distributed run; only rank 0 writes.
    """
    cfg = cfg or ScoreConfig()
    out = Path(out)
    writer = dist is None or dist.rank == 0
    base_format = parse_format(cfg.base_format)
    if base_format.quantized and dist is not None and dist.fsdp:
        raise ValueError("--base-format quantizes the frozen factors whole on every process; it does not run "
                         "under --fsdp (which shards them instead)")
    if finished_run(out, "acip.json", "an artifact", resume, writer):
        return load_artifact(out)
    lock = RunLock(out) if writer else None
    if lock:
        lock.__enter__()
    try:
        torch.manual_seed(cfg.seed)
        device = dist.device if dist else pick_device()
        sharded = bool(dist and dist.fsdp)
        loads = dist is None or dist.loads_weights  # under FSDP only rank 0 reads weights, builds the basis
        if not loads:
            dist.barrier()  # rank 0 has the model (converted/downloaded once) and the basis
        model, tokenizer = load_base(model_source, meta=not loads)
        check_context(model.config, cfg.seq_len)  # before the basis is built (minutes)
        if not sharded:
            model.to(device)  # sharded: FSDP moves each rank's shard to the device, never the whole model
        linears = target_linears(model, targets)  # TargetError (with what the model has) when none
        chosen = target_names(linears)
        log.info("%s: %d target layers (%s: %s), %.1f %% of its 2-D weights", type(model).__name__,
                 len(linears), "discovered" if targets is None else "--targets", ",".join(chosen),
                 100 * weight_share(model, linears))
        fp = target_fingerprint(linears) if loads else None
        recipe = default_recipe(basis_kind, data)
        basis = basis_for(model, tokenizer, linears, recipe, fp) if loads else meta_basis(linears)
        if base_format.quantized:  # the cached basis is memory-mapped and one surviving tensor keeps the whole
            # mapping resident: the singular values, the only basis tensors the run keeps, get their own
            # memory (U and Vh are packed and dropped; measured: 1.6 -> 0.7 GB before step 1)
            basis = {n: Factors(f.U, f.s.clone(), f.Vh) for n, f in basis.items()}
        if sharded and loads:
            dist.barrier()
        windows = token_windows(tokenizer, load_text(data), cfg.seq_len)
        stream = BatchStream(windows, cfg.batch_size, cfg.seed)
        if dist:
            stream = dist.shard_stream(stream)
        originals = parametrize_(model, basis, cfg.mask_scale, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        if not loads:
            dist.real_trainables(acip_layers(model))
        layers = train_only_masks_and_lora_(model)
        if dist:
            dist.broadcast_params(layers)
        check = basis_check(basis) if loads else None
        shapes = {n: [m.out_features, m.in_features, m.bias is not None] for n, m in linears.items()}
        train_model, teacher = model, None
        if cfg.objective != "lm":
            if sharded:
                raise ValueError(f"objective {cfg.objective} needs the whole original model on every "
                                 "process; it does not run under --fsdp")
            teacher = original_model(model, originals)
        if sharded:
            train_model = dist.shard_frozen(model, layers, autocast_dtype(cfg.precision, device))
            basis = originals = linears = None  # the full frozen tensors now live only in FSDP's shards
        if base_format.quantized:  # the frozen factors in int8/int4 only: dense weights and float factors go
            for name, l in layers.items():
                try:
                    l.quantize_base_(base_format)
                except ValueError as e:
                    raise ValueError(f"--base-format {base_format.key} does not fit layer {name}: {e}") from None
            basis = originals = linears = None
            for t in itertools.chain(model.parameters(), model.buffers()):  # the rest off the model file's
                t.data = t.data.clone()  # mapping, which then goes (measured: 1.6 -> 0.7 GB before step 1)
            release_memory()  # the float factors and the quantizer's temporaries
        identity = run_identity(cfg, model=recorded_source(model_source), data=data, basis=basis_kind,
                                targets=sorted(layers), processes=dist.world_size if dist else 1)
        scores, state = score_loop(train_model, layers, stream, cfg, out, resume, on_step, should_stop,
                                   reduce_grads=dist.reducer(layers) if dist else None, is_writer=writer,
                                   teacher=teacher, identity=identity)
        teacher = None
        if state.phase != "done":
            return None
        if dist:
            dist.check_identical(layers)  # every rank must end with the same masks and LoRA
        adapters = {f"{n}.{k}": getattr(l, k).detach().cpu() for n, l in layers.items()
                    for k in ("lora_A", "lora_B")}
        if base_format.quantized:  # the transfer: the full-precision base (the basis from its cache) takes
            model = train_model = layers = None  # the score map and adapters for the curve and every later use
            release_memory()
            model, tokenizer = load_base(model_source)
            basis = basis_for(model, tokenizer, target_linears(model, list(shapes)), recipe, fp)
        elif not sharded:
            replace_modules_(model, originals)
            model.cpu()
        meta = dict(
            model=dict(source=recorded_source(model_source), fingerprint=fp, architecture=type(model).__name__,
                       model_type=model.config.model_type),
            targets=chosen,  # leaf names; the exact layers are `layers`' keys (reopened by them)
            targets_chosen_by="discovery" if targets is None else "--targets",
            layers=shapes,
            basis=dict(recipe=recipe, check=check),
            mask_scale=cfg.mask_scale,
            lora=dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout),
            scoring=dict(asdict(cfg), data=data, device=str(device),
                         processes=dist.world_size if dist else 1, fsdp=sharded),
            result=dict(steps=state.step, acip_steps=state.acip_steps, post_tune_steps=state.post_steps,
                        size_ratio_reached=round(state.size_ratio, 5),
                        stopped_by="stop_ratio" if state.size_ratio <= cfg.stop_ratio else "max_steps",
                        seconds=round(state.seconds, 1), **steps_memory(out)),
            versions=versions(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        artifact = Artifact(meta, scores, adapters)
        if not writer:
            return artifact
        if sharded:  # no rank holds the whole model: the curve is measured afterwards
            log.info("sharded run: no curve; measure it with `python -m acip_core curve --artifact %s`", out)
        else:
            any_size = AnySizeModel(model, tokenizer, basis, scores, adapters, cfg.lora_rank, cfg.lora_alpha)
            evals = {}
            if eval_data and eval_windows:
                evals["heldout"] = token_windows(tokenizer, load_text(eval_data), 256, eval_windows)
            start = time.perf_counter()
            artifact.curve = acip_curve(any_size, evals, curve_sizes or [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
            log.info("curve in %.1f s", time.perf_counter() - start)
        save_artifact(out, artifact)
        remove_checkpoint(out)
        return artifact
    finally:
        if lock:
            lock.__exit__()


def original_model(model, originals: dict) -> torch.nn.Module:
    """The original model beside a parametrized one (the distillation teacher): a module tree over
    the same tensors with the original linears in place of the ACIPLinears; no weight is copied."""
    swap = {id(model.get_submodule(n)): m for n, m in originals.items()}
    return clone_tree(model, swap).eval()

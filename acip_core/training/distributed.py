"""Distributed scoring under torchrun / accelerate launch (they set RANK, WORLD_SIZE, MASTER_ADDR…).

The global batch of a step is the same as in a single-process run and is split by rows across ranks;
the gradients of the trainable tensors (masks and LoRA, ~10 M values for a 135M model) are averaged with
one all-reduce per step (what DDP does), so masks and LoRA stay identical on every rank and the score
map is computed from full mask tensors. Only rank 0 writes files.

Where the model fits on each device, every rank holds the whole frozen model. Where it does not,
`shard_frozen` hands the frozen tensors (weights, U, Vh, embeddings, norms) to PyTorch's
FullyShardedDataParallel: each rank keeps 1/N of them and a decoder block's are all-gathered only
while that block runs (forward and backward). Masks and LoRA are FSDP's ignored states: whole on
every rank, averaged by the same all-reduce, so the scoring loop does not change. Under FSDP only
rank 0 reads the weights and builds the basis; the other ranks build the same modules on the meta
device (no memory) and receive rank 0's tensors one decoder block at a time before FSDP shards it, so
a node's start-up holds the model once, not once per process.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from acip_core.engine.parametrize import replace_modules_

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    fsdp: bool = False  # shard the frozen tensors (FSDP) instead of replicating them

    @classmethod
    def from_env(cls, fsdp: bool = False, cpu: bool = False) -> "DistContext | None":
        """A context when launched by torchrun/accelerate with more than one process, else None.

        fsdp: shard the frozen tensors; also on when `accelerate launch --use_fsdp` set ACCELERATE_USE_FSDP.
        cpu: the run's tensors stay on the CPU (fine-tuning: a size's quantized packs are laid out for
            the CPU kernels), so the ranks talk over gloo even where CUDA is there (NCCL has no CPU
            tensors: its broadcast of the LoRA failed at once).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        cuda = torch.cuda.is_available() and not cpu
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            # generous: under FSDP the other ranks wait while rank 0 alone loads and factorizes the model
            minutes = float(os.environ.get("ACIP_DIST_TIMEOUT_MINUTES", "120"))
            dist.init_process_group(backend="nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(minutes=minutes))
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        fsdp = fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        ctx = cls(dist.get_rank(), dist.get_world_size(), device, fsdp)
        log.info("rank %d of %d on %s%s", ctx.rank, ctx.world_size, device, ", FSDP" if fsdp else "")
        return ctx

    @property
    def loads_weights(self) -> bool:
        """Whether this rank reads the weights (all ranks, except under FSDP where only rank 0 does)."""
        return not self.fsdp or self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def real_trainables(self, layers) -> None:
        """Masks and LoRA of layers built on the meta device, as real tensors (values: broadcast_params)."""
        for layer in layers.values():
            layer.mask = nn.Parameter(torch.full(layer.mask.shape, layer.mask_scale, device=self.device))
            layer.lora_A = nn.Parameter(torch.zeros(layer.lora_A.shape, device=self.device))
            layer.lora_B = nn.Parameter(torch.zeros(layer.lora_B.shape, device=self.device))

    def shard_stream(self, stream):
        return ShardedStream(stream, self.rank, self.world_size)

    def broadcast_params(self, layers) -> None:
        for layer in layers.values():
            for p in (layer.mask, layer.lora_A, layer.lora_B):
                dist.broadcast(p.data, src=0)

    def shard_frozen(self, model: nn.Module, layers, dtype: torch.dtype | None = None) -> nn.Module:
        """Wraps `model` in FSDP (one unit per decoder block) so each rank holds 1/N of the frozen tensors.

        The factors of every ACIPLinear become frozen Parameters (FSDP shards parameters, not buffers).
        Rank 0's values are the truth: a rank that built `model` on the meta device receives them one
        unit at a time (allocate, broadcast, shard, next unit), so no rank ever holds more than its
        shards plus one whole unit. (FSDP's own sync_module_states does the same but only on GPUs.)
        FSDP flattens each unit into one tensor of one dtype, so under bf16 autocast every frozen tensor
        is stored in bf16 (the unsharded path keeps norms and embeddings in fp32). The caller must drop
        its own references to the full tensors (the basis, the original linears) for the memory to go.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        for layer in layers.values():
            for name in ("weight", "U", "Vh"):
                layer.register_parameter(name, nn.Parameter(layer._buffers.pop(name), requires_grad=False))
        trainable = [p for l in layers.values() for p in (l.mask, l.lora_A, l.lora_B)]
        keep = {id(p) for p in trainable}
        total = resident = 0
        for p in model.parameters():
            if id(p) not in keep:
                if dtype is not None:
                    p.data = p.data.to(dtype)
                total += p.numel()
                resident += 0 if p.is_meta else p.numel()
        log.info("FSDP: rank %d has %d of %d frozen values in memory before sharding", self.rank, resident, total)

        def wrap(module: nn.Module) -> nn.Module:
            mine = [p for p in module.parameters() if id(p) in keep]
            return FSDP(module, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
                        ignored_states=mine, device_id=self.device)

        block_names = set(getattr(model, "_no_split_modules", None) or [])  # transformers: the decoder block
        blocks = {n: m for n, m in model.named_modules() if type(m).__name__ in block_names}
        real = _RealFromRankZero(self.device, keep)
        for name, block in blocks.items():
            real.receive(block.modules())
            replace_modules_(model, {name: wrap(block)})
        real.receive(m for n, m in model.named_modules()  # what is outside the blocks: embeddings, head…
                     if not any(n == b or n.startswith(b + ".") for b in blocks))
        wrapped = wrap(model)
        held = sum(p.numel() for p in wrapped.parameters() if id(p) not in keep)
        log.info("FSDP: rank %d holds %d of %d frozen values (%.0f %%), %d units", self.rank, held, total,
                 100 * held / max(total, 1), sum(isinstance(m, FSDP) for m in wrapped.modules()))
        return wrapped

    def reducer(self, layers):
        return self.reducer_of([p for l in layers.values() for p in (l.mask, l.lora_A, l.lora_B)])

    def reducer_of(self, params: list):
        """Averages the gradients of `params` over the ranks (scoring: masks + LoRA; fine-tuning: LoRA)."""
        def reduce_grads():
            live = [p for p in params if p.grad is not None]
            flat = torch.cat([p.grad.reshape(-1) for p in live])
            dist.all_reduce(flat)  # one message per step
            flat /= self.world_size
            offset = 0
            for p in live:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        return reduce_grads

    def check_identical(self, layers) -> None:
        """Raises if any rank's masks or LoRA differ from rank 0's (bitwise, via a checksum)."""
        flat = torch.cat([p.detach().reshape(-1).double() for l in layers.values()
                          for p in (l.mask, l.lora_A, l.lora_B)])
        mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=flat.dtype, device=flat.device)).sum()])
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        if any(not torch.equal(e, everyone[0]) for e in everyone):
            raise RuntimeError(f"ranks ended with different masks/LoRA: {[e.tolist() for e in everyone]}")
        log.info("all %d ranks hold identical masks and LoRA", self.world_size)

    def close(self) -> None:
        from acip_core.training.train import peak_rss_mib

        peak = peak_rss_mib()
        gpu = f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB" \
            if self.device.type == "cuda" else ""
        log.info("rank %d: peak RSS %.0f MiB%s", self.rank, peak, gpu)
        if dist.is_initialized():
            dist.destroy_process_group()


class _RealFromRankZero:
    """Gives modules rank 0's frozen tensors on `device`: meta tensors are allocated first (shared ones
    stay shared, e.g. tied embeddings, so every rank flattens the same parameters), then every tensor
    is broadcast from rank 0. Tensors in `skip` (ids: the trainable masks and LoRA) are left alone."""

    def __init__(self, device: torch.device, skip: set[int]):
        self.device, self.skip = device, skip

    def receive(self, modules) -> None:
        """One unit's modules (tensors shared across units would be received twice: FSDP forbids them)."""
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old kept alive, real)
        for module in modules:
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or id(t) in self.skip:
                        continue
                    if id(t) not in done:
                        done[id(t)] = (t, self._real(t))
                    table[name] = done[id(t)][1]

    def _real(self, t: torch.Tensor) -> torch.Tensor:
        data = torch.empty_like(t, device=self.device) if t.is_meta else t.data.to(self.device)
        dist.broadcast(data, src=0)
        return nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data


class ShardedStream:
    """This rank's rows of the global batch of each step (global batch_size must divide evenly)."""

    def __init__(self, stream, rank: int, world_size: int):
        if stream.batch_size % world_size:
            raise ValueError(f"batch size {stream.batch_size} does not split over {world_size} processes")
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.batch_size = stream.batch_size // world_size

    def batch(self, step: int) -> torch.Tensor:
        return self.stream.batch(step)[self.rank::self.world_size]

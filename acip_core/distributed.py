"""Data-parallel scoring under torchrun / accelerate launch (they set RANK, WORLD_SIZE, MASTER_ADDR…).

Every rank holds the whole frozen model; the global batch of a step is the same as in a single-process
run and is split by rows across ranks; the gradients of the trainable tensors (masks and LoRA, ~10 M
values) are averaged with one all-reduce per step (what DDP does), so masks and LoRA stay identical on
every rank and the score map is computed from full mask tensors. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_env(cls) -> "DistContext | None":
        """A context when launched by torchrun/accelerate with more than one process, else None."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        ctx = cls(dist.get_rank(), dist.get_world_size(), device)
        log.info("rank %d of %d on %s", ctx.rank, ctx.world_size, device)
        return ctx

    def shard_stream(self, stream):
        return ShardedStream(stream, self.rank, self.world_size)

    def broadcast_params(self, layers) -> None:
        for layer in layers.values():
            for p in (layer.mask, layer.lora_A, layer.lora_B):
                dist.broadcast(p.data, src=0)

    def reducer(self, layers):
        params = [p for l in layers.values() for p in (l.mask, l.lora_A, l.lora_B)]

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
        mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=flat.dtype)).sum()])
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        if any(not torch.equal(e, everyone[0]) for e in everyone):
            raise RuntimeError(f"ranks ended with different masks/LoRA: {[e.tolist() for e in everyone]}")
        log.info("all %d ranks hold identical masks and LoRA", self.world_size)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class ShardedStream:
    """This rank's rows of the global batch of each step (global batch_size must divide evenly)."""

    def __init__(self, stream, rank: int, world_size: int):
        if stream.batch_size % world_size:
            raise ValueError(f"batch size {stream.batch_size} does not split over {world_size} processes")
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.batch_size = stream.batch_size // world_size

    def batch(self, step: int) -> torch.Tensor:
        return self.stream.batch(step)[self.rank::self.world_size]

"""Any size in real time: ranks -> a runnable model built from views of shared factors.

Each target layer's factors are stored once, permuted into its score order, with s folded into
the input factor and the LoRA merged exactly in front (paper Remark 2.3):
down = [(α/r)·A ; diag(s)·Vh] [r_lora + k, in] and up_t = [Bᵀ ; Uᵀ] [r_lora + k, out]. Keeping
rank r is then the row prefix [:r_lora + r] of both: contiguous views, no copy. A layer runs dense
(original weight, no LoRA: App. D.3) when the factorized form would not be smaller, so size 1.0
is the original model. Every materialized size is its own module tree (modules shallow-copied,
targets swapped); all tensors are shared read-only, so sizes can run concurrently.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .basis import Factors
from .layers import LowRankLinear
from .prune import DTYPE_BYTES, LayerShape, RankIndex

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Size:
    """One point of the family: the ranks to keep and what they cost."""

    prefix: int  # entries kept in the global order
    ranks: dict  # fqn -> kept rank
    size_ratio: float  # the paper's measure (target layers only)
    params: int  # every parameter of the materialized model
    dense_layers: int  # layers that run with their original weight

    def gigabytes(self, dtype: str = "float32") -> float:
        return self.params * DTYPE_BYTES[dtype] / 1e9


def non_target_params(model: nn.Module, targets) -> int:
    """Parameters outside the target layers (tied weights counted once)."""
    skip = {id(p) for n in targets for p in model.get_submodule(n).parameters()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class AnySizeModel:
    """A base model, its basis and a score map (+ LoRA): a model of any size, materialized on demand."""

    def __init__(self, base: nn.Module, tokenizer, basis: dict[str, Factors],
                 scores: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor] | None = None,
                 lora_rank: int = 0, lora_alpha: float = 16.0, meta: dict | None = None):
        self.base, self.tokenizer, self.meta = base.eval(), tokenizer, meta or {}
        self.targets = list(basis)
        self.originals = {n: base.get_submodule(n) for n in self.targets}
        self.shapes = {n: LayerShape(m.out_features, m.in_features, m.bias is not None)
                       for n, m in self.originals.items()}
        self.lora_rank = lora_rank if adapters else 0
        self.index = RankIndex(scores, self.shapes, self.lora_rank,
                               non_target_params(base, self.targets))
        scaling = lora_alpha / lora_rank if self.lora_rank else 0.0
        self._per_dtype = {}
        self._lock = threading.Lock()
        factors = {}
        for n, f in basis.items():
            order = self.index.orders[n]
            down, up_t = f.s[order, None] * f.Vh[order], f.U[:, order].t()  # [k, in], [k, out]
            if self.lora_rank:
                down = torch.cat([scaling * adapters[f"{n}.lora_A"].float(), down])
                up_t = torch.cat([adapters[f"{n}.lora_B"].float().t(), up_t])
            factors[n] = (down.contiguous(), up_t.contiguous())
        self._per_dtype[torch.float32] = (self.base, factors)

    # -- choosing a size ------------------------------------------------------------------------
    def size_at(self, prefix: int) -> Size:
        ranks = self.index.ranks_at(prefix)
        dense = sum(self.shapes[n].runs_dense(r, self.lora_rank) for n, r in ranks.items())
        return Size(prefix, ranks, self.index.ratio_at(prefix), self.index.params_at(prefix), dense)

    def size_for_ratio(self, size_ratio: float) -> Size:
        """The smallest size whose size_ratio is >= the target (never below it)."""
        return self.size_at(self.index.prefix_for_ratio(float(size_ratio)))

    def size_for_budget(self, gigabytes: float, dtype: str = "float32") -> Size:
        """The largest size whose materialized weights fit in `gigabytes` (1 GB = 1e9 bytes)."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
        if not gigabytes == gigabytes or gigabytes <= 0:  # NaN or non-positive
            raise ValueError(f"the budget must be a positive number of GB, got {gigabytes}")
        prefix = self.index.prefix_for_params(int(gigabytes * 1e9 / DTYPE_BYTES[dtype]))
        if prefix < 0:
            smallest = self.index.smallest_params() * DTYPE_BYTES[dtype] / 1e9
            raise ValueError(f"{gigabytes:g} GB is smaller than the smallest model "
                             f"({smallest:.3f} GB in {dtype})")
        return self.size_at(prefix)

    def full_size(self) -> Size:
        return self.size_at(len(self.index.layer_of))

    # -- materializing --------------------------------------------------------------------------
    def _for_dtype(self, dtype: torch.dtype):
        with self._lock:
            if dtype not in self._per_dtype:
                base, factors = self._per_dtype[torch.float32]
                self._per_dtype[dtype] = (_cast_like_from_pretrained(base, dtype),
                                          {n: (a.to(dtype), b.to(dtype)) for n, (a, b) in factors.items()})
            return self._per_dtype[dtype]

    def materialize(self, size: Size | dict, dtype: str | torch.dtype = "float32") -> nn.Module:
        """A runnable model at `size` (a Size or a dict fqn -> rank), sharing the base's tensors."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        ranks = size.ranks if isinstance(size, Size) else size
        base, factors = self._for_dtype(dtype)
        swap = {}
        for n in self.targets:
            original = base.get_submodule(n)
            r = int(ranks[n])
            if not 0 <= r <= self.shapes[n].full_rank:
                raise ValueError(f"{n}: rank {r} outside [0, {self.shapes[n].full_rank}]")
            if self.shapes[n].runs_dense(r, self.lora_rank):
                swap[id(original)] = original  # shared module: the original weight, no LoRA
                continue
            down, up_t = factors[n]
            keep = self.lora_rank + r
            swap[id(original)] = LowRankLinear(down[:keep], up_t[:keep], original.bias).eval()  # views
        model = _clone_tree(base, swap)
        model.generation_config = copy.deepcopy(base.generation_config)  # generate() may edit it
        return model


def _clone_tree(module: nn.Module, swap: dict[int, nn.Module]) -> nn.Module:
    """A new module tree over the same tensors: each module shallow-copied, swapped ones replaced.

    A deepcopy with every tensor memoized gives the same result but walks every attribute of
    every object (~40 ms for SmolLM2); modules only own their child dicts, so copying those is enough.
    """
    if id(module) in swap:
        return swap[id(module)]
    new = copy.copy(module)
    new.__dict__.update(  # not through Module.__setattr__: these are its own bookkeeping dicts
        _parameters=dict(module._parameters), _buffers=dict(module._buffers),
        _modules={k: None if c is None else _clone_tree(c, swap) for k, c in module._modules.items()})
    return new


def count_params(model: nn.Module) -> int:
    """Parameters a materialized model holds (low-rank factors included, shared tensors once)."""
    seen, total = set(), 0
    tensors = list(model.parameters())
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            tensors += [t for t in (m.down, m.up_t, m.bias) if t is not None]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _cast_like_from_pretrained(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `base` in `dtype` whose non-persistent buffers (rotary inv_freq) stay as they are,
    as `from_pretrained(dtype=...)` leaves them: an export then computes the same numbers."""
    model = copy.deepcopy(base).to(dtype)
    originals = dict(base.named_modules())
    for name, module in model.named_modules():
        for buf in module._non_persistent_buffers_set:
            if module._buffers.get(buf) is not None:
                module._buffers[buf] = originals[name]._buffers[buf].clone()
    return model

"""Size accounting and the global score threshold: pure functions over FQN-keyed shapes and scores.

Two measures, both exact:
- size_ratio (the paper's, acip-method.md §2.5): over target layers only, each layer charged
  min(out·in, r·(in+out)) (+ out for a bias), divided by the dense total. LoRA excluded.
- total bytes of the materialized model in a Format (formats.py): every tensor it holds (embeddings,
  norms, head, LoRA merged into the factors, scales and zeros of quantized weights). A layer runs
  dense (original weight, no LoRA) when its factorized form, LoRA included, would take at least as
  many bytes *in that format* as the dense weight (int4 rounds kept ranks up to its group size); in an
  int format's `fast` layout its second kernel call is charged `Format.call_bytes` more (a call's
  floor is worth ~110-150 KB of reading, so a small layer such as k_proj runs faster dense at any rank).

Two size rules (SIZE_RULES; an artifact records its own, ours is the default):
- "acip-studio": a ratio is met from above (>=, ties broken by singular-value order) and a layer runs
  dense as above.
- "official": the rule of the official ACIP code, for imported official checkpoints (official.py,
  ARCHITECTURE.md "Official ACIP checkpoints"): the largest number k >= 1 of lowest scores pruned
  whose ratio stays strictly above the target, every score above the k-th smallest kept (ties at the
  threshold pruned together), and no dense fallback: every target layer stays factorized with its LoRA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from acip_core.formats.registry import Format

SIZE_RULES = ("acip-studio", "official")
DEFAULT_SIZE_RULE = "acip-studio"


def check_size_rule(rule: str) -> str:
    if rule not in SIZE_RULES:
        raise ValueError(f"unknown size rule {rule!r}; known: {', '.join(SIZE_RULES)}")
    return rule


@dataclass(frozen=True)
class LayerShape:
    out_features: int
    in_features: int
    bias: bool = False
    dense_fallback: bool = True  # False under the official size rule: always factorized, LoRA kept

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features + self.out_features * self.bias

    def paper_params(self, rank: int) -> int:
        """Parameters the paper charges at this rank: min(dense, factorized)."""
        factorized = rank * (self.in_features + self.out_features) + self.out_features * self.bias
        return min(self.dense_params, factorized)

    def runs_dense(self, rank: int, lora_rank: int = 0) -> bool:
        return self.dense_fallback and (rank + lora_rank) * (self.in_features + self.out_features) >= \
            self.out_features * self.in_features

    def materialized_params(self, rank: int, lora_rank: int = 0) -> int:
        if self.runs_dense(rank, lora_rank):
            return self.dense_params
        return (rank + lora_rank) * (self.in_features + self.out_features) + self.out_features * self.bias

    def padded_rank(self, lora_rank: int, format: Format) -> int:
        """Rows of the stored factors: LoRA + full rank, padded with zeros to the format's rank step."""
        step = format.rank_step
        return -(-(self.full_rank + lora_rank) // step) * step

    @functools.lru_cache(maxsize=None)  # a model has a handful of distinct shapes: few entries, asked 420x a size
    def format_bytes(self, rank: int, lora_rank: int, format: Format) -> tuple[int, bool]:
        """(bytes, runs dense) of this layer at `rank` in `format`: the factorized form when it is smaller
        by more than the cost of its second kernel call (none at rank 0: no call), else dense."""
        bias = self.out_features * self.bias * format.float_bytes
        dense = format.weight_bytes(self.out_features, self.in_features) + bias
        kept = format.kept_rank(rank + lora_rank, self.padded_rank(lora_rank, format))
        factored = format.weight_bytes(kept, self.in_features) + format.weight_bytes(self.out_features, kept) + bias
        charge = format.call_bytes if kept else 0
        return (dense, True) if self.dense_fallback and factored + charge >= dense else (factored, False)

    def format_params(self, rank: int, lora_rank: int, format: Format) -> int:
        """Weights this layer holds at `rank` in `format` (materialized_params with the format's dense
        choice and its kept rank, rounded up to the rank step)."""
        if self.format_bytes(rank, lora_rank, format)[1]:
            return self.dense_params
        kept = format.kept_rank(rank + lora_rank, self.padded_rank(lora_rank, format))
        return kept * (self.in_features + self.out_features) + self.out_features * self.bias


def size_ratio(shapes: dict[str, LayerShape], ranks: dict[str, int]) -> float:
    """The paper's size ratio (kept fraction of target-layer parameters)."""
    dense = sum(s.dense_params for s in shapes.values())
    return sum(shapes[n].paper_params(ranks[n]) for n in shapes) / dense


def _paper_table(sh: LayerShape) -> torch.Tensor:
    r = torch.arange(sh.full_rank + 1, dtype=torch.int64)
    return torch.clamp(r * (sh.in_features + sh.out_features), max=sh.out_features * sh.in_features) \
        + sh.out_features * sh.bias


def _format_table(sh: LayerShape, lora_rank: int, format: Format) -> torch.Tensor:
    """Bytes of a layer at rank 0..k in `format` (non-decreasing: kept ranks round up, dense caps)."""
    return torch.tensor([sh.format_bytes(r, lora_rank, format)[0] for r in range(sh.full_rank + 1)],
                        dtype=torch.int64)


def _materialized_table(sh: LayerShape, lora_rank: int) -> torch.Tensor:
    r = torch.arange(sh.full_rank + 1, dtype=torch.int64)
    factorized = (r + lora_rank) * (sh.in_features + sh.out_features)
    dense = sh.out_features * sh.in_features
    if not sh.dense_fallback:
        return factorized + sh.out_features * sh.bias
    return torch.where(factorized >= dense, dense, factorized) + sh.out_features * sh.bias


class RankIndex:
    """The global pruning order of a score map; answers "which ranks for this size?" in O(log N).

    Entries are ordered by score (descending), ties broken by the index inside the layer (the
    singular-value order: larger first), then by layer order. Restricted to one layer this is the
    layer's own order, so every prefix of the global order keeps a prefix of every layer. The
    size of every prefix is precomputed once with a cumulative sum.
    """

    def __init__(self, scores: dict[str, torch.Tensor], shapes: dict[str, LayerShape],
                 lora_rank: int = 0, other_params: int = 0, size_rule: str = DEFAULT_SIZE_RULE):
        if set(scores) != set(shapes):
            raise ValueError("scores and shapes name different layers")
        self.names = list(shapes)
        self.shapes, self.lora_rank, self.other_params = shapes, lora_rank, other_params
        self.size_rule = check_size_rule(size_rule)
        self.orders = {}  # per layer: its entries by descending score (stable: index order on ties)
        layer_ids, positions, keys, indices = [], [], [], []
        for lid, name in enumerate(self.names):
            s = scores[name].detach().float().cpu()
            if s.numel() != shapes[name].full_rank:
                raise ValueError(f"{name}: {s.numel()} scores for a layer of rank {shapes[name].full_rank}")
            order = torch.sort(s, descending=True, stable=True).indices
            self.orders[name] = order
            position = torch.empty_like(order)
            position[order] = torch.arange(len(order))
            layer_ids.append(torch.full_like(order, lid))
            positions.append(position)
            keys.append(s)
            indices.append(torch.arange(len(order)))
        layer_id, position, key = torch.cat(layer_ids), torch.cat(positions), torch.cat(keys)
        # stable sorts from the least to the most significant key: layer, index, score
        perm = torch.sort(torch.cat(indices), stable=True).indices
        perm = perm[torch.sort(key[perm], descending=True, stable=True).indices]
        self.layer_of = layer_id[perm]  # [N] layer of the p-th kept entry
        pos = position[perm]  # [N] its position in its layer's order: keeping it makes rank pos+1
        self._pos, self._bytes = pos, {}
        self._descending = key[perm]  # [N] the scores in the global order (the official rule's threshold)
        self.paper_cum = self._cumulative(pos, _paper_table)
        self.params_cum = self._cumulative(pos, lambda sh: _materialized_table(sh, lora_rank))
        self.params_cum += other_params
        self.dense_total = sum(sh.dense_params for sh in shapes.values())

    def _cumulative(self, pos: torch.Tensor, params) -> torch.Tensor:
        """Parameters of the first p entries for p = 0..N (int64)."""
        tables = [params(self.shapes[n]) for n in self.names]  # per layer: parameters at rank 0..k
        offsets = torch.tensor([0] + [len(t) for t in tables[:-1]]).cumsum(0)
        flat = torch.cat(tables)
        at = offsets[self.layer_of] + pos  # keeping entry p takes its layer from rank pos to pos+1
        deltas = flat[at + 1] - flat[at]
        start = int(sum(t[0] for t in tables))
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(deltas, 0)]) + start

    def ranks_at(self, p: int) -> dict[str, int]:
        counts = torch.bincount(self.layer_of[:p], minlength=len(self.names)).tolist()
        return dict(zip(self.names, counts))

    def prefix_for_ratio(self, target: float) -> int:
        """Fewest entries whose size ratio is >= target (never below it)."""
        if not 0.0 <= target <= 1.0 or target != target:
            raise ValueError(f"size_ratio must be within [0, 1], got {target}")
        if target == 1.0:  # the paper's rule: 1.0 keeps everything
            return len(self.layer_of)
        if self.size_rule == "official":
            return self._official_prefix(target)
        need = torch.tensor([target * self.dense_total - 1e-6], dtype=torch.float64)
        return int(torch.searchsorted(self.paper_cum.double(), need, side="left"))

    def _official_prefix(self, target: float) -> int:
        """The official rule: prune the k lowest scores for the largest k >= 1 whose ratio is strictly
        above `target`, keeping every score above the k-th smallest (torch.kthvalue's). Those are a
        prefix of the global order (descending scores); with ties at the threshold it is shorter than
        n - k, as in the official code. The ratio falls as k grows, so the largest k is the count of
        those that pass (the official binary search finds the same k)."""
        ascending = self._descending.flip(0)
        n = len(ascending)
        kept = n - torch.searchsorted(ascending, ascending, right=True)  # [n]: kept entries for k = 1..n
        above = (self.paper_cum[kept].double() / self.dense_total) > target
        k = max(int(above.sum()), 1)
        return int(kept[k - 1])

    def prefix_for_params(self, max_params: int) -> int:
        """Most entries whose materialized model holds at most max_params; -1 if none fits."""
        return int(torch.searchsorted(self.params_cum, torch.tensor([max_params]), side="right")) - 1

    def bytes_cum(self, format: Format, other_bytes: int) -> torch.Tensor:
        """Bytes of the materialized model after each prefix, in `format` (computed once per format)."""
        if format.key not in self._bytes:
            cum = self._cumulative(self._pos, lambda sh: _format_table(sh, self.lora_rank, format))
            self._bytes[format.key] = cum + other_bytes
        return self._bytes[format.key]

    def prefix_for_bytes(self, format: Format, other_bytes: int, max_bytes: int) -> int:
        """Most entries whose materialized model takes at most max_bytes in format; -1 if none fits."""
        cum = self.bytes_cum(format, other_bytes)
        return int(torch.searchsorted(cum, torch.tensor([max_bytes]), side="right")) - 1

    def ratio_at(self, p: int) -> float:
        return float(self.paper_cum[p]) / self.dense_total

    def params_at(self, p: int) -> int:
        return int(self.params_cum[p])

    def smallest_params(self) -> int:
        return int(self.params_cum[0])

"""The methods a user would otherwise pick, on the same size accounting as ACIP.

- svd-magnitude: plain SVD, keep the largest singular values globally (the paper's "SVD-Magn.")
- whitened-magnitude: the activation-whitened basis, truncated by singular value (SVD-LLM-like)
- uniform-whitened: the same fraction of ranks in every layer of the whitened basis
- block-removal: greedily drop the decoder block whose removal changes the output least (IteRABRe-like,
  without recovery). A removed block is rank 0 in all its projections: its attention and MLP add
  nothing to the residual stream, which is exactly skipping the block (for bias-free o/down layers).
All are score maps (or rank choices) over a basis, so they materialize like ACIP, without LoRA.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

from .materialize import AnySizeModel, Size

log = logging.getLogger(__name__)

METHODS = ("acip", "svd-magnitude", "whitened-magnitude", "uniform-whitened", "block-removal")


def magnitude_scores(basis) -> dict[str, torch.Tensor]:
    return {n: f.s.clone() for n, f in basis.items()}


def uniform_scores(basis) -> dict[str, torch.Tensor]:
    """Score 1 − i/k for the i-th singular value: a global threshold keeps the same fraction everywhere."""
    return {n: 1.0 - torch.arange(len(f.s), dtype=torch.float32) / len(f.s) for n, f in basis.items()}


def block_of(fqn: str) -> int:
    match = re.search(r"\.(\d+)\.", fqn)  # model.layers.3.…, transformer.h.3.… (GPT-2), …
    if match is None:
        raise ValueError(f"{fqn} is not inside a numbered decoder block")
    return int(match.group(1))


def ranks_without(any_size: AnySizeModel, removed: set[int]) -> dict[str, int]:
    return {n: 0 if block_of(n) in removed else any_size.shapes[n].full_rank for n in any_size.targets}


@torch.no_grad()
def block_removal_order(any_size: AnySizeModel, windows: torch.Tensor, on_progress=None) -> list[int]:
    """Greedy: repeatedly remove the block whose removal keeps the final hidden states most similar
    (mean cosine similarity) to those of the current model, on the calibration windows."""
    blocks = sorted({block_of(n) for n in any_size.targets})
    removed: list[int] = []

    def hidden(model):
        return model(input_ids=windows, output_hidden_states=True).hidden_states[-1].float()

    while len(removed) < len(blocks) - 1:
        current = hidden(any_size.materialize(ranks_without(any_size, set(removed))))
        best, best_sim = None, -2.0
        for b in blocks:
            if b in removed:
                continue
            h = hidden(any_size.materialize(ranks_without(any_size, set(removed) | {b})))
            sim = F.cosine_similarity(h, current, dim=-1).mean().item()
            if sim > best_sim:
                best, best_sim = b, sim
        removed.append(best)
        log.info("block removal: drop block %d (similarity %.4f)", best, best_sim)
        if on_progress:
            on_progress(len(removed), len(blocks) - 1)
    return removed


def block_removal_size(any_size: AnySizeModel, order: list[int], size_ratio: float, fmt="float32") -> Size:
    """The most blocks removed (in `order`) whose size ratio is still >= the target."""
    from .prune import size_ratio as ratio_of

    if not 0.0 <= size_ratio <= 1.0 or size_ratio != size_ratio:
        raise ValueError(f"size_ratio must be within [0, 1], got {size_ratio}")
    best = ranks_without(any_size, set())
    for j in range(1, len(order) + 1):
        ranks = ranks_without(any_size, set(order[:j]))
        if ratio_of(any_size.shapes, ranks) < size_ratio:
            break
        best = ranks
    return sized(any_size, best, fmt)


def block_removal_sizes(any_size: AnySizeModel, order: list[int], fmt="float32") -> list[Size]:
    """Every discrete size of the method: 0, 1, 2, … blocks removed."""
    return [sized(any_size, ranks_without(any_size, set(order[:j])), fmt) for j in range(len(order) + 1)]


def sized(any_size: AnySizeModel, ranks: dict[str, int], fmt="float32") -> Size:
    from .formats import parse_format
    from .prune import size_ratio as ratio_of

    fmt = parse_format(fmt)
    params = any_size.index.other_params + sum(
        any_size.shapes[n].materialized_params(r, any_size.lora_rank) for n, r in ranks.items())
    layers = [any_size.shapes[n].format_bytes(r, any_size.lora_rank, fmt) for n, r in ranks.items()]
    nbytes = any_size.other_bytes(fmt) + sum(b for b, _ in layers)
    return Size(-1, ranks, ratio_of(any_size.shapes, ranks), params, sum(d for _, d in layers), fmt, nbytes)

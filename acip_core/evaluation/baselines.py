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
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import pandas as pd
import torch.nn.functional as F

from acip_core.artifacts.artifact import Artifact, ArtifactError, save_artifact
from acip_core.artifacts.open import artifact_linears, calibration_for, open_folder, target_fingerprint
from acip_core.artifacts.tuned import is_tuned
from acip_core.engine.basis import basis_for, default_recipe
from acip_core.engine.materialize import AnySizeModel, Size
from acip_core.engine.prune import size_ratio as ratio_of
from acip_core.evaluation.curve import DEFAULT_SIZES, size_row
from acip_core.evaluation.evaluate import perplexity
from acip_core.formats.registry import parse_format

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


def block_removal_size(any_size: AnySizeModel, order: list[int], size_ratio: float, format="float32") -> Size:
    """The most blocks removed (in `order`) whose size ratio is still >= the target."""
    if not 0.0 <= size_ratio <= 1.0 or size_ratio != size_ratio:
        raise ValueError(f"size_ratio must be within [0, 1], got {size_ratio}")
    best = ranks_without(any_size, set())
    for j in range(1, len(order) + 1):
        ranks = ranks_without(any_size, set(order[:j]))
        if ratio_of(any_size.shapes, ranks) < size_ratio:
            break
        best = ranks
    return sized(any_size, best, format)


def block_removal_sizes(any_size: AnySizeModel, order: list[int], format="float32") -> list[Size]:
    """Every discrete size of the method: 0, 1, 2, … blocks removed."""
    return [sized(any_size, ranks_without(any_size, set(order[:j])), format) for j in range(len(order) + 1)]


def sized(any_size: AnySizeModel, ranks: dict[str, int], format="float32") -> Size:
    format = parse_format(format)
    params = any_size.index.other_params + sum(
        any_size.shapes[n].materialized_params(r, any_size.lora_rank) for n, r in ranks.items())
    layers = [any_size.shapes[n].format_bytes(r, any_size.lora_rank, format) for n, r in ranks.items()]
    nbytes = any_size.other_bytes(format) + sum(b for b, _ in layers)
    return Size(-1, ranks, ratio_of(any_size.shapes, ranks), params, sum(d for _, d in layers), format, nbytes)


def open_method(folder: str | Path, method: str = "acip"):
    """The AnySizeModel of a method on the artifact's base model (baselines carry no LoRA).

    Returns (any_size, artifact). For block-removal the size is chosen with
    baselines.block_removal_size and the artifact's stored block order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    opened = open_folder(folder, build=None if method == "acip" else partial(method_model, method))
    return opened.any_size, opened.artifact


def method_model(method: str, artifact: Artifact, model, tokenizer, on_progress=None) -> AnySizeModel:
    """A baseline's AnySizeModel on the artifact's loaded base model (open_folder's `build`)."""
    linears = artifact_linears(artifact, model)
    fp = target_fingerprint(linears)
    recipe = artifact.meta.basis.recipe
    if method in ("svd-magnitude", "block-removal"):
        recipe = default_recipe("svd")
    elif recipe["kind"] != "whitened":
        recipe = default_recipe("whitened")
    basis = basis_for(model, tokenizer, linears, recipe, fp, on_progress)
    scores = uniform_scores(basis) if method == "uniform-whitened" else magnitude_scores(basis)
    return AnySizeModel(model, tokenizer, basis, scores, meta=artifact.meta,
                        calibration=calibration_for(model, tokenizer, linears, artifact.meta.basis.recipe))


def method_size(method: str, any_size: AnySizeModel, artifact: Artifact, size_ratio: float, format="float32"):
    """The Size of `method` for a target ratio in `format` (block removal: its nearest discrete size above)."""
    if method != "block-removal":
        return any_size.size_for_ratio(size_ratio, format)
    order = artifact.meta.block_removal_order
    if order is None:
        raise ArtifactError(f"{artifact.path} has no block-removal order yet: run "
                            f"python -m acip_core curve --artifact {artifact.path}")
    return block_removal_size(any_size, order, size_ratio, format)


def method_curve(folder, method: str, evals: dict[str, torch.Tensor], sizes=DEFAULT_SIZES, format="bfloat16",
                 batch_size: int = 4, calib_windows: torch.Tensor | None = None, on_progress=None) -> pd.DataFrame:
    """Rows of one method in one format at every size (block removal: at each of its own discrete sizes)."""
    any_size, artifact = open_method(folder, method)
    if method == "block-removal":
        order = artifact.meta.block_removal_order
        if order is None:
            order = block_removal_order(any_size, calib_windows, on_progress)
            artifact.meta = replace(artifact.meta, block_removal_order=tuple(order))
            save_artifact(folder, artifact)
        points = [(None, s) for s in block_removal_sizes(any_size, order, format) if s.size_ratio >= min(sizes) - 1e-9]
    else:
        points = [(t, any_size.size_for_ratio(t, format)) for t in sizes]
    # windows: the fewest of any eval set, so a set's standard error (nll_std / √windows) is never
    # smaller than measured; seq_len: a perplexity is comparable only at the same window length
    shape = dict(windows=min((len(w) for w in evals.values()), default=0),
                 seq_len=max((w.shape[-1] for w in evals.values()), default=0))
    rows = []
    for i, (target, size) in enumerate(points):
        row = dict(size_row(method, target, size), **shape)
        net = any_size.materialize(size, format)
        for name, windows in evals.items():
            result = perplexity(net, windows, batch_size)
            row[f"ppl_{name}"], row[f"nll_std_{name}"] = result["perplexity"], result["nll_std"]
        del net
        rows.append(row)
        log.info("%s %.3f: %s", method, size.size_ratio, {k: round(v, 3) for k, v in row.items() if k.startswith("ppl")})
        if on_progress:
            on_progress(i + 1, len(points))
    if method == "acip":  # the reference line, measured the same way
        row = dict(size_row("original", 1.0, any_size.original_size(format)), **shape)
        for name, windows in evals.items():
            result = perplexity(any_size.materialize(any_size.original_size(format), format), windows, batch_size)
            row[f"ppl_{name}"], row[f"nll_std_{name}"] = result["perplexity"], result["nll_std"]
        rows.insert(0, row)
    return pd.DataFrame(rows)


def open_sized(folder: str | Path, size_ratio: float | None = None, budget_gb: float | None = None,
               format=None, method: str = "acip"):
    """(model, size) for a command's --artifact, size and format options. A tuned size's folder brings
    its own size (the options may be left out, or must name that size) and its format (the default);
    an artifact needs a size or a budget, and defaults to float32."""
    if is_tuned(folder):
        if method != "acip":
            raise ValueError(f"{folder} is a tuned ACIP size; --method {method} needs an artifact")
        opened = open_folder(folder)
        model, size = opened.any_size, opened.size
        if budget_gb is not None or (size_ratio is not None and abs(size_ratio - size.size_ratio) > 5e-3):
            raise ValueError(f"{folder} is a tuned size with its own size ({size.size_ratio:.4f}); "
                             "leave out --size-ratio / --budget-gb")
        return model, model.size_at(size.prefix, format or opened.tuned.format)
    format = format or "float32"
    if size_ratio is None and budget_gb is None:
        raise ValueError("give --size-ratio or --budget-gb (only a tuned size's folder has its own size)")
    model, artifact = open_method(folder, method)
    if budget_gb is not None:
        if method == "block-removal":
            raise ValueError("block-removal takes --size-ratio, not --budget-gb")
        return model, model.size_for_budget(budget_gb, format)
    return model, method_size(method, model, artifact, size_ratio, format)

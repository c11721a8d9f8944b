"""Bases W = U·diag(s)·Vh for the target layers: plain SVD (the paper) or activation-whitened SVD.

Whitened (SVD-LLM style): with G = XᵀX/n + ε·mean(diag)·I the input Gram matrix and G = L·Lᵀ,
take the SVD of W·L = U·diag(s)·Vh and use Vh' = Vh·L⁻¹. Then W = U·diag(s)·Vh' exactly, and
dropping a small s costs little *on the calibration activations*, which plain SVD ignores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from safetensors.torch import load_file, save_file
from torch import nn

from acip_core.engine.tree import clone_tree
from acip_core.sources.data import DEFAULT_DATA, load_text, token_windows
from acip_core.sources.models import cache_dir
from acip_core.system.disk import evict_oldest
from acip_core.system.limits import limits

log = logging.getLogger(__name__)

BASIS_KINDS = ("whitened", "svd")
WHITENING_EPS = 1e-2  # relative ridge on the Gram matrix (platform-notes.md)
BASIS_VERSION = 2  # bump when the construction changes, so cached bases are rebuilt


@dataclass
class Factors:
    U: torch.Tensor  # [out, k] fp32
    s: torch.Tensor  # [k] fp32, descending
    Vh: torch.Tensor  # [k, in] fp32 (orthonormal rows only for the plain SVD)


def svd_factors(weight: torch.Tensor) -> Factors:
    U, s, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)  # fp64: W = U·s·Vh to ~1e-7
    return Factors(U.float().contiguous(), s.float(), Vh.float().contiguous())


def meta_basis(linears: dict[str, nn.Linear]) -> dict[str, Factors]:
    """Factors with every basis' shapes (k = min(out, in)) on the meta device: no memory, no values."""
    def meta(*shape):
        return torch.empty(*shape, device="meta")
    return {n: Factors(meta(m.out_features, min(m.weight.shape)), meta(min(m.weight.shape)),
                       meta(min(m.weight.shape), m.in_features)) for n, m in linears.items()}


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor) -> Factors:
    g = gram.double()
    g = g + WHITENING_EPS * g.diagonal().mean().clamp_min(1e-12) * torch.eye(len(g), dtype=g.dtype)
    L = torch.linalg.cholesky(g)  # [in, in] lower
    U, s, Vh = torch.linalg.svd(weight.detach().double() @ L, full_matrices=False)
    Vh = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)  # Vh·L⁻¹
    return Factors(U.float().contiguous(), s.float(), Vh.float().contiguous())


@torch.no_grad()
def input_grams(model: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor,
                batch_size: int = 4, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """XᵀX/n of every layer's input over the calibration windows, via forward hooks, summed in `dtype`.
    Layers that read the same input (q, k, v; gate, up) get the same tensor, summed once."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}  # layer -> the first layer seen reading its input
    # the input is kept alive in the cache so its id() cannot be reused by another tensor in the batch
    cache: dict[int, tuple[torch.Tensor, str]] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            if id(x) not in cache:
                cache[id(x)] = (x, name)
            first = owner.setdefault(name, cache[id(x)][1])
            if first != name:
                return
            flat = x.reshape(-1, x.shape[-1]).float()
            product = (flat.T @ flat).to(dtype)  # fp32 product per batch, summed in `dtype`
            sums[name] = sums[name].add_(product) if name in sums else product
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for i in range(0, len(windows), batch_size):
            cache.clear()
            model(windows[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        cache.clear()
    means = {n: (g / counts[n]).cpu() for n, g in sums.items()}
    return {n: means[owner[n]] for n in owner}


def build_basis(model: nn.Module, linears: dict[str, nn.Linear], kind: str,
                windows: torch.Tensor | None = None, on_progress=None) -> dict[str, Factors]:
    """Factors for every layer; `windows` (token ids [n, L]) are needed for the whitened basis."""
    if kind not in BASIS_KINDS:
        raise ValueError(f"unknown basis {kind!r}; choose one of {BASIS_KINDS}")
    grams = None
    if kind == "whitened":
        if windows is None or len(windows) == 0:
            raise ValueError("the whitened basis needs calibration windows")
        grams = input_grams(model, linears, windows)
    basis = {}
    for i, (name, linear) in enumerate(linears.items()):
        w = linear.weight.detach().float().cpu()
        basis[name] = svd_factors(w) if grams is None else whitened_factors(w, grams[name])
        if on_progress:
            on_progress(i + 1, len(linears))
    return basis


def basis_check(basis: dict[str, Factors]) -> dict[str, list[float]]:
    """A small numeric summary (sum and max of s per layer) stored in the artifact."""
    return {n: [float(f.s.sum()), float(f.s[0]) if len(f.s) else 0.0] for n, f in basis.items()}


def verify_basis(basis: dict[str, Factors], expected: dict[str, list[float]], rtol=1e-3) -> None:
    """Raises ValueError naming the first layer whose rebuilt basis does not match the artifact's."""
    if set(basis) != set(expected):
        missing = sorted(set(expected) ^ set(basis))[:3]
        raise ValueError(f"basis layers differ from the artifact's (e.g. {missing})")
    for name, f in basis.items():
        got = basis_check({name: f})[name]
        for g, e in zip(got, expected[name]):
            if abs(g - e) > rtol * max(abs(e), 1e-6):
                raise ValueError(f"rebuilt basis of {name} does not match the artifact "
                                 f"(singular values {got} vs {expected[name]}): wrong base model "
                                 f"or calibration data")


def cached_basis(key: dict, build, cache_root: Path) -> dict[str, Factors]:
    """Loads the basis for `key` from cache_root, or builds it with `build()` and caches it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root / "bases" / f"{key.get('kind', 'basis')}-{digest}.safetensors"
    if path.is_file():
        try:
            start = time.perf_counter()
            tensors = load_file(path)
            basis = _unflatten(tensors)
            os.utime(path)  # recently used: the cache bound evicts it last
            log.info("loaded cached basis %s in %.1f s", path.name, time.perf_counter() - start)
            return basis
        except Exception as err:  # a corrupt cache is rebuilt, never trusted
            log.warning("cached basis %s unreadable (%s); rebuilding", path, err)
    basis = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(_flatten(basis), tmp, metadata={"key": json.dumps(key, sort_keys=True)})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    evict_bases(cache_root, keep=[path])
    return basis


def evict_bases(cache_root: Path, keep=()) -> list[Path]:
    """Removes the least recently used cached bases beyond limits().bases_bytes (each new
    calibration text makes one: ~0.6 GB for SmolLM2)."""
    removed = evict_oldest(cache_root / "bases", limits().bases_bytes, keep=keep,
                           entries=(cache_root / "bases").glob("*.safetensors"))
    for p in removed:
        log.info("removed the least recently used basis %s (cache bound)", p.name)
    return removed


def _flatten(basis: dict[str, Factors]) -> dict[str, torch.Tensor]:
    out = {}
    for name, f in basis.items():
        out[f"{name}.U"], out[f"{name}.s"], out[f"{name}.Vh"] = f.U, f.s, f.Vh
    return out


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, Factors]:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: Factors(tensors[f"{n}.U"], tensors[f"{n}.s"], tensors[f"{n}.Vh"]) for n in names}


def default_recipe(kind: str = "whitened", data: str = DEFAULT_DATA) -> dict:
    """How the basis is (re)built; stored in the artifact so a later load rebuilds the same one.
    The whitening statistics come from the same text as the scoring run."""
    return {"kind": kind, "data": data, "windows": 64, "seq_len": 256} if kind == "whitened" \
        else {"kind": kind}


def calibration_windows(tokenizer, recipe: dict, text: str | None = None) -> torch.Tensor:
    """The recipe's calibration windows: evenly spaced over the whole text, not only its first part."""

    windows = token_windows(tokenizer, load_text(recipe["data"]) if text is None else text, recipe["seq_len"])
    pick = torch.linspace(0, len(windows) - 1, min(recipe["windows"], len(windows))).long()
    return windows[pick]


GRAM_WINDOWS = 16  # calibration windows for int4's Grams: 64 were no better, at 4x the time (RESULTS.md, "int4 quantizer")


def calibration_grams(model: nn.Module, tokenizer, linears: dict[str, nn.Linear], recipe: dict) -> dict:
    """Every layer input's second moment over GRAM_WINDOWS windows of the recipe's calibration text
    (float32), for the error-compensating int4 quantizer (formats.int4.quantize_int4). Not cached: one
    forward pass, each time an int4 family is built (ARCHITECTURE.md, "int4 quantizer")."""
    start = time.perf_counter()
    windows = calibration_windows(tokenizer, dict(recipe, windows=GRAM_WINDOWS))
    # on a tree of its own: its hooks must not see (nor break) a float32 size's forward, whose dense
    # layers are these very modules, run by another request meanwhile
    private = clone_tree(model, {}, own_hooks=True)
    grams = input_grams(private, {n: private.get_submodule(n) for n in linears}, windows, dtype=torch.float32)
    log.info("measured %d input Grams for int4 in %.1f s", len(grams), time.perf_counter() - start)
    return grams


def basis_for(model: nn.Module, tokenizer, linears: dict[str, nn.Linear], recipe: dict,
              model_fingerprint: str, on_progress=None, prebuilt=None) -> dict[str, Factors]:
    """The basis described by `recipe` for this model, from the cache or built (and cached).
    `prebuilt`: () -> factors that are this recipe's basis read from elsewhere (an official checkpoint's
    own SVD factors, official.py), called and cached in place of building it when not cached yet."""

    text = load_text(recipe["data"]) if recipe["kind"] == "whitened" else ""

    def build():
        if prebuilt is not None:
            return prebuilt()
        windows = calibration_windows(tokenizer, recipe, text) if recipe["kind"] == "whitened" else None
        start = time.perf_counter()
        basis = build_basis(model, linears, recipe["kind"], windows, on_progress)
        log.info("built the %s basis of %d layers in %.1f s", recipe["kind"], len(basis),
                 time.perf_counter() - start)
        return basis

    # the key holds the text's hash too: an edited corpus file must not reuse a stale basis
    key = dict(recipe, model=model_fingerprint, layers=len(linears), version=BASIS_VERSION,
               text=hashlib.sha256(text.encode()).hexdigest()[:16])
    basis = cached_basis(key, build, cache_dir())
    return {n: basis[n] for n in linears}

"""Shared helpers for tests: load a tiny model with its basis and parametrize it."""

import torch

from acip_core.engine.basis import build_basis
from acip_core.sources.data import load_text, token_windows
from acip_core.sources.models import load_base
from acip_core.engine.parametrize import parametrize_, target_linears


def calib_windows(tokenizer, n=8, seq_len=32):
    return token_windows(tokenizer, load_text("corpus:train")[:100_000], seq_len, n)


def model_and_basis(folder, kind="whitened"):
    model, tok = load_base(folder)
    linears = target_linears(model)
    basis = build_basis(model, linears, kind, calib_windows(tok) if kind == "whitened" else None)
    return model, tok, linears, basis


def random_ids(vocab, shape=(2, 24), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def parametrized_copy(folder, kind="whitened", **kw):
    model, tok, linears, basis = model_and_basis(folder, kind)
    originals = parametrize_(model, basis, **kw)
    return model, tok, basis, originals


def random_any_size(folder, seed=0, lora_rank=4, lora_alpha=8.0):
    """An AnySizeModel of a tiny model with random scores and random LoRA adapters."""
    from acip_core.engine.materialize import AnySizeModel

    model, tok, linears, basis = model_and_basis(folder)
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.randn(len(f.s), generator=g) for n, f in basis.items()}
    adapters = {}
    for n, f in basis.items():
        adapters[f"{n}.lora_A"] = 0.1 * torch.randn(lora_rank, f.Vh.shape[1], generator=g)
        adapters[f"{n}.lora_B"] = 0.1 * torch.randn(f.U.shape[0], lora_rank, generator=g)
    return AnySizeModel(model, tok, basis, scores, adapters, lora_rank, lora_alpha), basis, adapters


def score_tiny(model_dir, out, curve_sizes=(0.5,), eval_windows=2, **overrides):
    """The tests' one scoring recipe on a tiny model (reaches its stop ratio in a few seconds): LoRA
    rank 2, so low-rank layers exist at the sizes tests ask for. Returns the artifact folder."""
    from acip_core import ScoreConfig, run_scoring

    settings = dict(steps=400, batch_size=2, seq_len=32, lr=2e-3, reg_init=1e-2, reg_growth=1.05,
                    stop_ratio=0.4, post_tune_steps=5, checkpoint_every=10, precision="fp32", lora_rank=2,
                    lora_alpha=4.0)
    settings.update(overrides)
    run_scoring(model_dir, "corpus:train", out, "whitened", ScoreConfig(**settings),
                eval_windows=eval_windows, curve_sizes=list(curve_sizes))
    return out

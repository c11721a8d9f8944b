import threading

import pytest
import torch

from acip_core.evaluation.evaluate import generate_text
from acip_core.engine.materialize import count_params
from acip_core.sources.models import load_base
from acip_core.engine.parametrize import acip_layers, parametrize_, replace_modules_
from helpers import random_any_size, random_ids

LORA_RANK, LORA_ALPHA = 4, 8.0


def _any_size(folder, seed=0):
    return random_any_size(folder, seed, LORA_RANK, LORA_ALPHA)


def _reference(folder, any_size, basis, adapters, ranks):
    """The slow path: the scoring-form model with masks set to the ranks, dense layers restored."""
    model, _ = load_base(folder)
    originals = parametrize_(model, basis, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0)
    dense = {}
    with torch.no_grad():
        for n, layer in acip_layers(model).items():
            order = any_size.index.orders[n]
            layer.mask.fill_(-0.02)
            layer.mask[order[:ranks[n]]] = 0.02
            layer.lora_A.copy_(adapters[f"{n}.lora_A"])
            layer.lora_B.copy_(adapters[f"{n}.lora_B"])
            if any_size.shapes[n].runs_dense(ranks[n], LORA_RANK):
                dense[n] = originals[n]
    replace_modules_(model, dense)
    return model.eval()


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.85])
def test_materialized_equals_slow_reference(tiny_model_dir, ratio):
    any_size, basis, adapters = _any_size(tiny_model_dir)
    size = any_size.size_for_ratio(ratio)
    fast = any_size.materialize(size)
    slow = _reference(tiny_model_dir, any_size, basis, adapters, size.ranks)
    ids = random_ids(len(any_size.tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, slow(ids).logits, atol=1e-4, rtol=1e-4)
    assert count_params(fast) == size.params


def test_full_size_is_the_original_model_exactly(tiny_model_dir):
    any_size, _, _ = _any_size(tiny_model_dir)
    original, _ = load_base(tiny_model_dir)
    full = any_size.materialize(any_size.size_for_ratio(1.0))
    assert any_size.size_for_ratio(1.0).dense_layers == len(any_size.targets)
    ids = random_ids(len(any_size.tokenizer))
    with torch.no_grad():
        assert torch.equal(full(ids).logits, original(ids).logits)


def test_sizes_share_tensors_and_leave_the_base_untouched(tiny_llama):
    any_size, _, _ = _any_size(tiny_llama)
    before = {k: v.clone() for k, v in any_size.base.state_dict().items()}
    small = any_size.materialize(any_size.size_for_ratio(0.4))
    assert small.model.embed_tokens.weight is any_size.base.model.embed_tokens.weight
    any_size.materialize(any_size.size_for_ratio(0.9))
    for k, v in any_size.base.state_dict().items():
        assert torch.equal(v, before[k])


def test_budget_picks_largest_size_that_fits(tiny_llama):
    any_size, _, _ = _any_size(tiny_llama)
    full_gb = any_size.full_size().gigabytes
    size = any_size.size_for_budget(full_gb * 0.8, "float32")
    assert size.gigabytes <= full_gb * 0.8 and size.nbytes == 4 * size.params
    assert count_params(any_size.materialize(size)) == size.params
    with pytest.raises(ValueError, match="smaller than the smallest model"):
        any_size.size_for_budget(1e-9, "float32")
    for bad in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError):
            any_size.size_for_budget(bad)


def test_two_sizes_generate_concurrently_without_interfering(tiny_llama):
    any_size, _, _ = _any_size(tiny_llama)
    tok = any_size.tokenizer
    models = {r: any_size.materialize(any_size.size_for_ratio(r)) for r in (0.4, 1.0)}
    prompt = "The package manager installs"
    alone = {r: generate_text(m, tok, prompt, 24, chat=False, repetition_penalty=1.0) for r, m in models.items()}
    assert alone[0.4] != alone[1.0]
    results, errors = {}, []

    def work(r):
        try:
            for i in range(3):
                results[(r, i)] = generate_text(models[r], tok, prompt, 24, chat=False, repetition_penalty=1.0)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(r,)) for r in (0.4, 1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(text == alone[r] for (r, _), text in results.items())


def test_bfloat16_materialization_runs_and_stays_close(tiny_llama):
    any_size, _, _ = _any_size(tiny_llama)
    size = any_size.size_for_ratio(0.7)
    ids = random_ids(len(any_size.tokenizer))
    with torch.no_grad():
        a = any_size.materialize(size, "float32")(ids).logits
        b = any_size.materialize(size, "bfloat16")(ids).logits.float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_a_hook_on_one_size_runs_on_that_size_only(tiny_llama, fmt):
    """lm-eval puts a stop hook on the size it measures (its root): another visitor's size of the same
    format (and the next family built from the base) must not run it."""
    model = random_any_size(tiny_llama)[0]
    ids = random_ids(len(model.tokenizer))
    a = model.materialize(model.size_for_ratio(0.5, fmt), fmt)
    calls = []
    handles = [a.register_forward_pre_hook(lambda *_: calls.append(1)),
               a.register_forward_hook(lambda *_: calls.append(2))]
    b = model.materialize(model.size_for_ratio(0.9, fmt), fmt)
    with torch.no_grad():
        b(ids)
        model.materialize(model.full_size(fmt), fmt)(ids)
        model.materialize(model.size_for_ratio(0.7, "bfloat16"), "bfloat16")(ids)  # a family built now
    assert calls == []
    with torch.no_grad():
        a(ids)
    assert calls
    for h in handles:
        h.remove()


def test_a_budget_of_exactly_a_sizes_bytes_takes_that_size(tiny_llama):
    model = random_any_size(tiny_llama)[0]
    for r in (0.3, 0.55, 0.8):
        for fmt in ("float32", "int8"):
            size = model.size_for_ratio(r, fmt)
            assert model.size_for_budget(size.gigabytes, fmt).nbytes == size.nbytes, (r, fmt)


def test_int4_calibration_hooks_a_tree_of_its_own(tiny_llama, monkeypatch):
    """The Grams are measured with hooks on modules no size shares (a float32 size's dense layers are
    the original modules: another request's forward would add to the Grams, or break the pass), and
    they equal the Grams measured on the model itself."""
    from acip_core.engine import basis

    model = random_any_size(tiny_llama)[0]
    recipe = dict(kind="whitened", data="corpus:train", seq_len=32)
    hooked = []
    real = basis.input_grams
    monkeypatch.setattr(basis, "input_grams", lambda m, linears, *a, **k: hooked.extend(linears.values()) or real(m, linears, *a, **k))
    grams = basis.calibration_grams(model.base, model.tokenizer, model.originals, recipe)
    shared = {id(m) for m in model.base.modules()}
    assert hooked and not any(id(m) in shared for m in hooked)
    assert not any(m._forward_pre_hooks for m in model.base.modules())
    windows = basis.calibration_windows(model.tokenizer, dict(recipe, windows=basis.GRAM_WINDOWS))
    want = real(model.base, model.originals, windows, dtype=torch.float32)
    assert grams.keys() == want.keys() and all(torch.equal(grams[n], want[n]) for n in want)


@pytest.mark.parametrize("first, then", [("int8", "int8+emb8"), ("int8+fast", "int8"), ("int4-g32", "int4-g32+emb8")])
def test_format_variants_share_their_packed_weights(tiny_llama_wide, first, then):
    """int8, int8+emb8 and int8+fast pack the same dense weights and factors: a second variant shares
    them (one family's memory, as the memory plan counts it) and gives the numbers it gives alone."""
    from acip_core.engine.materialize import count_bytes

    model = random_any_size(tiny_llama_wide)[0]
    ids = random_ids(len(model.tokenizer))
    model.materialize(model.size_for_ratio(0.6, first), first)
    size = model.size_for_ratio(0.6, then)
    shared = model.materialize(size, then)
    a, b = model._families[first], model._families[then]
    assert b[1] is a[1]  # the factors
    assert all(model._targets_of[then][n].qweight is model._targets_of[first][n].qweight for n in model.targets)
    alone = random_any_size(tiny_llama_wide)[0]  # the same random model, this variant built alone
    with torch.no_grad():
        assert torch.equal(shared(ids).logits, alone.materialize(alone.size_for_ratio(0.6, then), then)(ids).logits)
    assert count_bytes(shared) == size.nbytes

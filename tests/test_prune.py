import random

import pytest
import torch

from acip_core.engine.prune import LayerShape, RankIndex, size_ratio

SHAPES = {"a": LayerShape(4, 6), "b": LayerShape(10, 3, bias=True), "c": LayerShape(8, 8)}


def test_size_accounting_on_hand_made_shapes():
    a, b, c = SHAPES["a"], SHAPES["b"], SHAPES["c"]
    assert (a.dense_params, b.dense_params, c.dense_params) == (24, 40, 64)
    assert a.paper_params(2) == 20 and a.paper_params(3) == 24  # min(24, r·10)
    assert b.paper_params(1) == 13 + 10 and b.paper_params(3) == 40  # bias on both sides
    assert c.paper_params(4) == 64 and c.paper_params(3) == 48  # 8×8 compresses only below rank 4
    ranks = {"a": 1, "b": 2, "c": 3}
    assert size_ratio(SHAPES, ranks) == pytest.approx((10 + 36 + 48) / 128)
    # materialized: a layer with LoRA runs dense when (r + r_lora)(in + out) >= out·in
    assert c.runs_dense(2, lora_rank=2) and not c.runs_dense(1, lora_rank=2)
    assert c.materialized_params(1, lora_rank=2) == 48


def _scores(seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, sh in SHAPES.items():
        s = torch.rand(sh.full_rank, generator=g)
        out[n] = torch.round(s * 3) if ties else s
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_prefix_keeps_a_prefix_of_every_layer_in_score_order(ties):
    scores = _scores(ties=ties)
    index = RankIndex(scores, SHAPES)
    total = sum(sh.full_rank for sh in SHAPES.values())
    for p in range(total + 1):
        ranks = index.ranks_at(p)
        assert sum(ranks.values()) == p
        kept_scores = [scores[n][index.orders[n][:r]] for n, r in ranks.items()]
        dropped = [scores[n][index.orders[n][r:]] for n, r in ranks.items()]
        lo = min((k.min() for k in kept_scores if len(k)), default=float("inf"))
        hi = max((d.max() for d in dropped if len(d)), default=float("-inf"))
        assert lo >= hi  # a global threshold
        assert index.ratio_at(p) == pytest.approx(size_ratio(SHAPES, ranks))


def test_ratio_is_reached_never_below_and_reversible():
    shapes = {f"l{i}": LayerShape(64, 48) for i in range(6)}
    scores = {n: torch.rand(48, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(shapes)}
    index = RankIndex(scores, shapes)
    seen = {}
    rng = random.Random(0)
    for target in [rng.uniform(0, 1) for _ in range(200)] + [0.0, 1.0, 0.5, 0.3, 0.8, 0.3]:
        p = index.prefix_for_ratio(target)
        ratio = index.ratio_at(p)
        assert target - 1e-9 <= ratio <= target + 0.01
        assert p == 0 or target == 1.0 or index.ratio_at(p - 1) < target  # the smallest that reaches it
        assert seen.setdefault(target, p) == p  # any order, same answer
    assert index.ranks_at(index.prefix_for_ratio(1.0)) == {n: 48 for n in shapes}


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5])
def test_out_of_range_ratio_is_an_error(bad):
    with pytest.raises(ValueError, match="size_ratio"):
        RankIndex(_scores(), SHAPES).prefix_for_ratio(bad)


def test_budget_gives_the_largest_model_that_fits():
    index = RankIndex(_scores(), SHAPES, lora_rank=1, other_params=100)
    for budget in range(index.smallest_params(), index.params_at(len(index.layer_of)) + 5):
        p = index.prefix_for_params(budget)
        assert index.params_at(p) <= budget
        assert p == len(index.layer_of) or index.params_at(p + 1) > budget
    assert index.prefix_for_params(index.smallest_params() - 1) == -1


def test_threshold_search_scales_to_llama_7b_shapes():
    import time

    shapes = {}
    for b in range(32):
        for n, (o, i) in {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
                          "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}.items():
            shapes[f"{b}.{n}"] = LayerShape(o, i)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(sh.full_rank, generator=g) for n, sh in shapes.items()}
    index = RankIndex(scores, shapes)
    assert sum(sh.full_rank for sh in shapes.values()) == 917_504
    start = time.perf_counter()
    ratio = index.ratio_at(index.prefix_for_ratio(0.5))
    assert 0.5 <= ratio <= 0.51 and time.perf_counter() - start < 5  # correctness; speed in benchmarks/


def test_the_fast_layout_charges_the_second_kernel_call():
    """SmolLM2's shapes, no tiny fixture: the charge is on. A low-rank layer in an int format makes
    two kernel calls, so in the fast layout it must save more than `call_bytes` over dense to run
    factorized; the small layout (the default) keeps the paper's byte rule."""
    from acip_core.formats.registry import Format, parse_format

    k_proj, gate = LayerShape(192, 576), LayerShape(1536, 576)
    for key in ("int8", "int4"):
        fmt = Format(key, layout="fast")
        assert parse_format(fmt.key) == fmt and fmt.key.endswith("+fast")
        assert fmt.call_bytes > 0 and Format(key).call_bytes == 0
        small = [k_proj.format_bytes(r, 0, Format(key))[1] for r in range(1, 193)]
        assert not small[0] and small[-1]  # the byte rule: factorized at low rank, dense at full rank
        dense = fmt.weight_bytes(192, 576)
        # k_proj at the smallest kept rank is smaller factorized, but not by a call: dense at every rank > 0
        step = fmt.rank_step
        factored = fmt.weight_bytes(step, 576) + fmt.weight_bytes(192, step)
        assert factored < dense < factored + fmt.call_bytes
        assert all(k_proj.format_bytes(r, 0, fmt) == (dense, True) for r in range(1, 193))
        assert k_proj.format_bytes(0, 0, fmt)[1] is False  # rank 0: no call (only `up`'s scales held)
        # the wide MLP layer: factorized while it saves more than the call, dense from there on
        forms = [gate.format_bytes(r, 0, fmt) for r in range(577)]
        switch = next(r for r, (_, dense_now) in enumerate(forms) if dense_now)
        assert 128 < switch < 576 and all(d for _, d in forms[switch:])
        kept = fmt.kept_rank(switch, 576)
        assert fmt.weight_bytes(kept, 576) + fmt.weight_bytes(1536, kept) + fmt.call_bytes >= fmt.weight_bytes(1536, 576)
        bytes_ = [b for b, _ in forms]
        assert bytes_ == sorted(bytes_)  # non-decreasing in the rank: budgets stay binary searches
    # float formats keep the paper's byte rule: k_proj factorized below rank 144
    assert k_proj.format_bytes(143, 0, Format("float32"))[1] is False

import pytest
import torch

from acip_core.evaluation.baselines import block_of, block_removal_order, block_removal_size, ranks_without, uniform_scores
from acip_core.engine.basis import Factors
from acip_core.evaluation.baselines import method_size, open_method
from acip_core.evaluation.evaluate import perplexity
from helpers import random_ids


def test_uniform_scores_keep_the_same_fraction_everywhere():
    from acip_core.engine.prune import LayerShape, RankIndex

    basis = {"a": Factors(torch.eye(8), torch.ones(8), torch.eye(8)),
             "b": Factors(torch.eye(16)[:, :16], torch.ones(16), torch.eye(16))}
    index = RankIndex(uniform_scores(basis), {"a": LayerShape(8, 8), "b": LayerShape(16, 16)})
    ranks = index.ranks_at(12)
    assert ranks == {"a": 4, "b": 8}


def test_removed_block_is_skipped_exactly(tiny_artifact):
    any_size, _ = open_method(tiny_artifact, "block-removal")
    model = any_size.materialize(ranks_without(any_size, {1}))
    base = any_size.base
    ids = random_ids(len(any_size.tokenizer))
    layers = base.model.layers
    # the same network with block 1 deleted from the list
    skipped = torch.nn.ModuleList([layers[0]])
    base.model.layers = skipped
    base.config.num_hidden_layers = 1
    try:
        with torch.no_grad():
            expected = base(ids, use_cache=False).logits
            got = model(ids, use_cache=False).logits
    finally:
        base.model.layers = layers
        base.config.num_hidden_layers = 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_block_removal_order_and_sizes(tiny_artifact):
    any_size, artifact = open_method(tiny_artifact, "block-removal")
    windows = random_ids(len(any_size.tokenizer), (2, 16))
    order = block_removal_order(any_size, windows)
    assert sorted(order) == [0] or sorted(order) == [1]  # two blocks: one can go
    size = block_removal_size(any_size, order, 0.4)
    assert size.size_ratio >= 0.4
    assert block_of("model.layers.12.mlp.up_proj") == 12


@pytest.mark.parametrize("method", ["svd-magnitude", "whitened-magnitude", "uniform-whitened"])
def test_baseline_methods_materialize_at_a_ratio(tiny_artifact, method):
    any_size, artifact = open_method(tiny_artifact, method)
    size = method_size(method, any_size, artifact, 0.6)
    assert 0.6 <= size.size_ratio <= 0.61 and any_size.lora_rank == 0
    windows = random_ids(len(any_size.tokenizer), (2, 16))
    assert perplexity(any_size.materialize(size), windows)["perplexity"] > 1


def test_unknown_method_is_refused(tiny_artifact):
    with pytest.raises(ValueError, match="unknown method"):
        open_method(tiny_artifact, "magic")

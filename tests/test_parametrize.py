import pytest
import torch

from acip_core.engine.parametrize import DEFAULT_TARGETS, acip_layers, replace_modules_, target_linears
from helpers import parametrized_copy, random_ids
from acip_core.sources.models import load_base


def test_targets_are_the_seven_projections_and_never_the_head(tiny_model_dir):
    model, _ = load_base(tiny_model_dir)
    names = target_linears(model)
    assert len(names) == 7 * model.config.num_hidden_layers
    assert {n.rsplit(".", 1)[-1] for n in names} == set(DEFAULT_TARGETS)
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert target_linears(model, ("q_proj",)).keys() == {n for n in names if n.endswith("q_proj")}


@pytest.mark.parametrize("kind", ["svd", "whitened"])
def test_full_size_zero_lora_reproduces_original_logits(tiny_model_dir, kind):
    original, _ = load_base(tiny_model_dir)
    model, tok, basis, originals = parametrized_copy(tiny_model_dir, kind)
    assert len(acip_layers(model)) == len(basis)
    if "qwen" in tiny_model_dir:  # biases carried over
        assert all(l.bias is not None for n, l in acip_layers(model).items() if n.endswith("q_proj"))
    ids = random_ids(len(tok))
    with torch.no_grad():
        diff = (model(ids).logits - original(ids).logits).abs().max()
    assert diff <= 1e-4
    replace_modules_(model, originals)
    assert not acip_layers(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)

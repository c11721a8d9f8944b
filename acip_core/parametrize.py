"""Target selection and module swapping on a Hugging Face causal LM."""

from __future__ import annotations

from torch import nn

from .basis import Factors
from .layers import ACIPLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_linears(model: nn.Module, targets=DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """The nn.Linear leaves whose last name is in `targets`, keyed by FQN; never the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head
            and name.rsplit(".", 1)[-1] in targets}


def replace_modules_(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Swaps each FQN's module for the given one, in place."""
    for fqn, new in replacements.items():
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def parametrize_(model: nn.Module, basis: dict[str, Factors], mask_scale=0.02, lora_rank=32,
                 lora_alpha=16.0, lora_dropout=0.05) -> dict[str, nn.Linear]:
    """Replaces every layer in `basis` by an ACIPLinear built from its factors, in place.

    Returns:
        the original nn.Linear modules keyed by FQN, so the caller can put them back.
    """
    originals = {name: model.get_submodule(name) for name in basis}
    device = next(model.parameters()).device
    new = {}
    for name, f in basis.items():
        linear = originals[name]
        new[name] = ACIPLinear(linear.weight, f.U.to(device), f.s.to(device), f.Vh.to(device),
                               bias=linear.bias, mask_scale=mask_scale, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, lora_dropout=lora_dropout).to(device)
        new[name].train(model.training)  # a fresh module is in training mode; follow the model
    replace_modules_(model, new)
    return originals


def acip_layers(model: nn.Module) -> dict[str, ACIPLinear]:
    """Every ACIPLinear of a parametrized model, keyed by FQN."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ACIPLinear)}

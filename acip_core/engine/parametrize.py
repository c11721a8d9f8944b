"""Target selection and module swapping on a Hugging Face causal LM.

Targets are discovered per model, not by a table of names: every linear projection inside the
decoder blocks (the model's largest nn.ModuleList), fused ones (`qkv_proj`,
`gate_up_proj`, `query_key_value`) included as one matrix each; never embeddings, the LM head,
norms or MoE routers. GPT-2's `transformers.pytorch_utils.Conv1D` (weight stored [in, out]) is
swapped in place for an equivalent nn.Linear ([out, in]) when it is chosen, so everything after
selection (basis, scoring, materialize, formats, export) sees one kind of layer; the swapped names are
kept on the model (`transposed_names`) for the dense export, which writes them back in Conv1D's layout.
"""

from __future__ import annotations

from torch import nn

from acip_core.engine.basis import Factors
from acip_core.engine.layers import ACIPLinear

# the Llama names: what artifacts written before discovery selected (they all store their layers too)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRANSPOSED_ATTR = "acip_transposed"  # model attribute: FQNs of Conv1D layers swapped for nn.Linear
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class TargetError(ValueError):
    """A model whose targets cannot be chosen (none found, or experts ACIP cannot factorize)."""


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every transformers >= 4.45 has it
        return ()
    return Conv1D


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (bool(conv1d) and isinstance(module, conv1d))


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(FQN, list) of the model's decoder blocks: its largest nn.ModuleList by parameters (not only one
    of a single class: a hybrid model's blocks may differ, while a smaller list inside one block, its
    experts, would be the wrong scope); None when it has none."""
    best, best_params = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = (name, module), params
    return best


def _is_router(leaf: str, module: nn.Module, expert_counts: set[int]) -> bool:
    """An MoE router or a shared expert's gate: a `*gate*`/`*router*` linear (not a `*_proj`) with one
    output per expert, or a single output."""
    if leaf.endswith("proj") or not ("gate" in leaf or "router" in leaf):
        return False
    out = _out_features(module)
    return out == 1 or out in expert_counts


def _candidates(model: nn.Module) -> tuple[dict[str, nn.Module], str | None]:
    """Every linear / Conv1D leaf inside the decoder blocks (or, without blocks, anywhere but the
    output head), and the blocks' FQN."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    blocks = decoder_blocks(model)
    root, scope = (blocks[0], blocks[1]) if blocks else ("", model)
    prefix = f"{root}." if root else ""
    found = {}
    for name, module in scope.named_modules():
        if name and _is_linear(module) and module is not head:
            found[prefix + name] = module
    return found, (root or None)


def _matches(fqn: str, names) -> bool:
    return any(fqn == t or fqn.endswith("." + t) for t in names)


def discover_targets(model: nn.Module, targets=None) -> dict[str, nn.Module]:
    """The layers ACIP compresses, keyed by FQN (nn.Linear or Conv1D, not yet swapped).

    Args:
        targets: None to discover (see the module docstring), or names: a layer is chosen when its
            FQN equals a name or ends with "." + name (`c_proj`, `mlp.c_proj`, a full FQN).
    Raises:
        TargetError: nothing chosen (the message names the model's class and what it has), or, when
            discovering, experts stored as 3-D parameters (Mixtral, Qwen-MoE in transformers 5).
    """
    found, root = _candidates(model)
    kind = type(model).__name__
    if targets is not None:
        names = [t for t in targets if t]
        chosen = {n: m for n, m in found.items() if _matches(n, names)}
        if not chosen:
            raise TargetError(f"{kind}: no linear layer matches --targets {','.join(names)}; "
                              f"its linear layers are named {_leaf_summary(found)}")
        return chosen
    config = getattr(model, "config", None)
    experts = {getattr(config, k) for k in _EXPERT_COUNTS if isinstance(getattr(config, k, None), int)}
    chosen = {n: m for n, m in found.items() if not _is_router(n.rsplit(".", 1)[-1], m, experts)}
    if root is not None:
        stacked = [(f"{root}.{n}", tuple(p.shape)) for n, p in model.get_submodule(root).named_parameters()
                   if p.dim() >= 3]
        if stacked:
            name, shape = stacked[0]
            raise TargetError(
                f"{kind} stores {len(stacked)} tensors of its blocks as stacked 3-D parameters (MoE "
                f"experts, e.g. {name} {list(shape)}), which are no linear layers ACIP can factorize; "
                f"compressing only the rest would mis-state the size. Pass --targets to compress named "
                f"linear layers only (its linear layers: {_leaf_summary(chosen)})")
    if not chosen:
        raise TargetError(f"{kind}: no linear layer found in its decoder blocks "
                          f"({root or 'no repeated blocks found'}); its modules' classes: "
                          f"{sorted({type(m).__name__ for m in model.modules()})[:20]}")
    return chosen


def _leaf_summary(found: dict) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in found})
    return ", ".join(leaves) if leaves else "(none)"


def target_names(linears) -> list[str]:
    """The leaf names of chosen layers (what `--targets` takes), in first-seen order."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))


def target_linears(model: nn.Module, targets=None) -> dict[str, nn.Linear]:
    """The layers ACIP compresses as nn.Linear, keyed by FQN (discovered, or `targets`: see
    discover_targets). Chosen Conv1D layers are swapped in place for equivalent nn.Linear."""
    chosen = discover_targets(model, targets)
    conv = {n: m for n, m in chosen.items() if not isinstance(m, nn.Linear)}
    if conv:
        replace_modules_(model, {n: _as_linear(m) for n, m in conv.items()})
        setattr(model, TRANSPOSED_ATTR, frozenset(transposed_names(model)) | frozenset(conv))
        chosen = {n: model.get_submodule(n) for n in chosen}
    return chosen


def transposed_names(model: nn.Module) -> frozenset:
    """FQNs of the Conv1D layers that target_linears swapped for nn.Linear (stored [in, out] by the base)."""
    return frozenset(getattr(model, TRANSPOSED_ATTR, ()))


def _as_linear(conv: nn.Module) -> nn.Linear:
    """Conv1D (y = x·W + b, W [in, out]) as the same nn.Linear (W [out, in]); on the same device."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype)
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = conv.bias
    linear.train(conv.training)
    return linear


def weight_share(model: nn.Module, linears) -> float:
    """Share of the model's 2-D weight values held by `linears` (tied tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.dim() == 2 and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    chosen = sum(m.weight.numel() for m in linears.values())
    return chosen / total if total else 0.0


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


def train_only_masks_and_lora_(model: nn.Module) -> dict[str, ACIPLinear]:
    """Freezes every parameter but the masks and LoRA of the ACIPLinear layers (what scoring trains);
    returns those layers keyed by FQN."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = acip_layers(model)
    for layer in layers.values():
        for p in (layer.mask, layer.lora_A, layer.lora_B):
            p.requires_grad_(True)
    return layers

"""Module trees over shared tensors: every materialized size, fine-tuning's tunable copy and int4's
calibration pass run a tree of their own (modules, child lists and hooks their own) whose tensors are
the family's, stored once (docs/ARCHITECTURE.md, "Materializing")."""

from __future__ import annotations

from torch import nn


def clone_tree(module: nn.Module, swap: dict[int, nn.Module]) -> nn.Module:
    """A new module tree over the same tensors: each module shallow-copied, swapped ones replaced.

    A deepcopy with every tensor memoized gives the same result but walks every attribute of
    every object (~40 ms for SmolLM2); modules only own their child dicts, so copying those is enough.
    """
    if id(module) in swap:
        return swap[id(module)]
    new = module.__class__.__new__(module.__class__)  # copy.copy's protocol costs ~4 hasattr a module
    new.__dict__.update(module.__dict__)
    new.__dict__.update(  # not through Module.__setattr__: these are its own bookkeeping dicts
        _parameters=dict(module._parameters), _buffers=dict(module._buffers),
        _modules={k: None if c is None else clone_tree(c, swap) for k, c in module._modules.items()},
        # hooks of its own: one registered on a size (lm-eval's stop hook) must not run on every other
        # size, nor on the base tree the next family is copied from
        **{name: type(module.__dict__[name])(module.__dict__[name]) for name in _HOOK_DICTS if name in module.__dict__})
    return new


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")

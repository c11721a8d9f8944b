"""Module trees over shared tensors: every materialized size, fine-tuning's tunable copy and int4's
calibration pass run a tree of their own (modules and child lists their own, the root's hooks too)
whose tensors are the family's, stored once (docs/ARCHITECTURE.md, "Layout")."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def clone_tree(module: nn.Module, swap: dict[int, nn.Module], own_hooks: bool = False, _root: bool = True) -> nn.Module:
    """A new module tree over the same tensors: each module shallow-copied, swapped ones replaced.

    A deepcopy with every tensor memoized gives the same result but walks every attribute of
    every object (~40 ms for SmolLM2); modules only own their child dicts, so copying those is enough.
    Hooks: the root's tables are its own (lm-eval's stop hook on a size must not run on every other
    size, nor on the base tree the next family is copied from); the other modules' too with
    `own_hooks` (int4's calibration pass hooks every target). Not by default: 11 new tables a module
    made a SmolLM2 tree 0.9 → 5.9 ms to clone, mostly the garbage collector's passes over them.
    """
    if id(module) in swap:
        return swap[id(module)]
    new = module.__class__.__new__(module.__class__)  # copy.copy's protocol costs ~4 hasattr a module
    state = new.__dict__
    state.update(module.__dict__)
    # not through Module.__setattr__: these are its own bookkeeping dicts
    state["_parameters"], state["_buffers"] = dict(module._parameters), dict(module._buffers)
    state["_modules"] = {k: None if c is None else clone_tree(c, swap, own_hooks, False)
                         for k, c in module._modules.items()}
    if _root or own_hooks:
        for name in _HOOK_DICTS:
            hooks = state.get(name)
            if hooks is not None:
                state[name] = hooks.copy() if hooks else OrderedDict()
    return new


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")

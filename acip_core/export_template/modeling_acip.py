"""ACIP low-rank causal LM: a stock transformers architecture whose listed linear layers are
factorized into two smaller linears, y = down(x) @ up_t + bias with down [rank, in] and
up_t [rank, out] (the layout ACIP Studio computes with, so both give the same numbers in every dtype).

Written by ACIP Studio next to config.json and model.safetensors. Self-contained: it needs only
torch and transformers (no ACIP Studio). Load with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

config.json names the base architecture (`acip_base_model_type`, e.g. "llama" or "qwen2") and the
factorized layers with their ranks (`acip_ranks`, {module name: rank}); every other layer is the
base architecture's own. `auto_map` names ACIPConfig__<base> and ACIPForCausalLM__<base>: this
module builds those classes on first use, subclassing the base config and CausalLM classes.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

CONFIG_PREFIX, MODEL_PREFIX, MODEL_TYPE_PREFIX = "ACIPConfig__", "ACIPForCausalLM__", "acip_lowrank_"
MIN_TRANSFORMERS = (4, 45)  # config.json carries both rope_theta (4.x) and rope_parameters (5.x)

if tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit()) < MIN_TRANSFORMERS:
    raise ImportError(f"this model needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}; "
                      f"found {transformers.__version__}: pip install -U transformers")


class LowRankLinear(nn.Module):
    """y = down(x) @ up_t + bias: a rank-`rank` stand-in for nn.Linear(in_features, out_features, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up_t = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.up_t.t(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorize_(model: nn.Module, ranks: dict) -> None:
    """Replaces each listed nn.Linear by a LowRankLinear of its rank (same device and dtype)."""
    for name, rank in (ranks or {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if isinstance(old, LowRankLinear):
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"acip_ranks names {name!r}, which is a {type(old).__name__}, not nn.Linear")
        setattr(parent, child, LowRankLinear(old.in_features, old.out_features, int(rank),
                                             old.bias is not None, old.weight.device, old.weight.dtype))


_CLASSES: dict = {}


def classes_for(base_model_type: str):
    """(config class, model class) for a base model_type, built once per process."""
    if base_model_type not in _CLASSES:
        try:
            base_config = CONFIG_MAPPING[base_model_type]
            base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        except (KeyError, ValueError):
            raise ValueError(f"this transformers version has no causal LM of type {base_model_type!r}; "
                             "upgrade transformers") from None
        config_cls = type(CONFIG_PREFIX + base_model_type, (base_config,), {
            "__module__": __name__,
            "__doc__": f"{base_config.__name__} plus `acip_ranks` {{module name: rank}}.",
            "model_type": MODEL_TYPE_PREFIX + base_model_type,
            "base_model_tp_plan": None,  # tensor-parallel plans of the base do not fit factorized layers
        })

        def __init__(self, config, *args, **kwargs):
            base_model.__init__(self, config, *args, **kwargs)
            factorize_(self, getattr(config, "acip_ranks", None))

        model_cls = type(MODEL_PREFIX + base_model_type, (base_model,), {
            "__module__": __name__,
            "__doc__": f"{base_model.__name__} with the layers of config.acip_ranks factorized.",
            "config_class": config_cls,
            "__init__": __init__,
        })
        _CLASSES[base_model_type] = (config_cls, model_cls)
    return _CLASSES[base_model_type]


def __getattr__(name: str):  # ACIPConfig__llama, ACIPForCausalLM__qwen2, ... (named in auto_map)
    for prefix, which in ((CONFIG_PREFIX, 0), (MODEL_PREFIX, 1)):
        if name.startswith(prefix) and len(name) > len(prefix):
            return classes_for(name[len(prefix):])[which]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

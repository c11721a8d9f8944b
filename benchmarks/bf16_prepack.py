"""An experiment, not a feature: does pre-packing the weights for oneDNN make bf16 decoding faster?

    .venv/bin/python benchmarks/bf16_prepack.py [--artifact DIR] [--size-ratio 0.5]

On this CPU a bf16 matrix-vector product through F.linear pays ~20-40 us per call on top of its bytes
(oneDNN re-lays the weight out on every call); torch.ops.mkldnn._linear_pointwise with a weight
re-laid out once (what torch.compile's freezing does) avoids that. This swaps every linear product of
a materialized model (dense layers, both factors of the low-rank ones, the LM head) for the pre-packed
op and measures decode/prefill tokens/s of the original and the size, plain and pre-packed, in one
process (acip_core.evaluation.bench.speed, alternating, medians). Outputs are checked against the plain models.
"""

import argparse
import json
import statistics

import torch
from torch import nn

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.evaluation.bench import speed  # noqa: E402
from acip_core.engine.layers import LowRankLinear  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):  # weight [out, in]
        super().__init__()
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        self.bias = bias

    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


class PackedLowRank(nn.Module):
    def __init__(self, m: LowRankLinear):
        super().__init__()
        self.down, self.up = PackedLinear(m.down, None), PackedLinear(m.up_t.t(), m.bias)

    def forward(self, x):
        return self.up(self.down(x))


def packed_copy(model: nn.Module) -> nn.Module:
    """The same model with every linear product pre-packed (a shallow copy: other tensors are shared)."""
    import copy

    out = copy.copy(model)
    out._modules = dict(model._modules)
    for name, child in model.named_children():
        if isinstance(child, LowRankLinear):
            out._modules[name] = PackedLowRank(child)
        elif isinstance(child, nn.Linear):
            out._modules[name] = PackedLinear(child.weight, child.bias)
        else:
            out._modules[name] = packed_copy(child)
    return out


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    parser.add_argument("--size-ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    any_size = open_artifact(args.artifact)
    plain = {"original": any_size.materialize(any_size.full_size(), "bfloat16"),
             f"size {args.size_ratio}": any_size.materialize(any_size.size_for_ratio(args.size_ratio), "bfloat16")}
    models = dict(plain)
    for name, m in plain.items():
        models[name + ", pre-packed"] = packed_copy(m)
    ids = torch.randint(100, len(any_size.tokenizer) - 1, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, m in plain.items():  # the swap must not change what the model computes
            a = m(input_ids=ids[:, :64]).logits.float()
            b = models[name + ", pre-packed"](input_ids=ids[:, :64]).logits.float()
            print(f"{name}: max |Δ logits| plain vs pre-packed {(a - b).abs().max():.3g} (|logits| max {a.abs().max():.3g})")
    for m in models.values():
        speed(m, ids[:, :32], 4)
    runs = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            runs[name].append(speed(m, ids, 128))
    table = {k: {key: statistics.median(r[key] for r in v) for key in ("decode_tok_s", "prefill_tok_s")}
             for k, v in runs.items()}
    base = table["original"]
    for name, row in table.items():
        print(f"{name:28s} decode {row['decode_tok_s']:6.1f} tok/s ({row['decode_tok_s'] / base['decode_tok_s']:.2f}x)  "
              f"prefill {row['prefill_tok_s']:7.1f} tok/s ({row['prefill_tok_s'] / base['prefill_tok_s']:.2f}x)")
    print(json.dumps(table))


if __name__ == "__main__":
    main()

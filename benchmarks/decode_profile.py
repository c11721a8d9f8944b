"""Where a decode step spends its time: torch.profiler over greedy decoding, original vs a size.

    .venv/bin/python benchmarks/decode_profile.py [--artifact DIR] [--size-ratio 0.5] [--format int4]
Prints, for each model, ms per new token split into matrix products (aten::mm/addmm/linear/matmul
kernels and torch's int8/int4 weight-only kernels) and everything else, and the top operators by self CPU time. The "everything else" part does
not shrink with the size: it bounds the decode speed-up of a smaller model (see benchmarks/RESULTS.md).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.artifacts.open import open_artifact  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::mv", "aten::addmv", "aten::_mkldnn_matmul",
              "aten::mkldnn_linear", "aten::matmul", "aten::linear",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu"}


@torch.no_grad()
def profile_decode(model, ids, new_tokens: int):
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(**kwargs, max_new_tokens=4, min_new_tokens=4)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the 4-token prefill is negligible
        model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS or "gemm" in e.key.lower()) / 1e3
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return total / new_tokens, matmul / new_tokens, [(e.key, e.self_cpu_time_total / 1e3 / new_tokens, e.count // new_tokens) for e in top]


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    parser.add_argument("--size-ratio", type=float, default=0.5)
    parser.add_argument("--format", default="float32", help="a format key: float32, bfloat16, int8, int4-g32+emb8, ...")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model = open_artifact(args.artifact)
    ids = torch.tensor([[1, 504, 3150, 282]])  # a short prompt: the profile is the decode steps
    for name, size in (("original", model.full_size(args.format)),
                       (f"size {args.size_ratio}", model.size_for_ratio(args.size_ratio, args.format))):
        per_token, matmul, top = profile_decode(model.materialize(size, args.format), ids, args.new_tokens)
        print(f"{name} ({args.format}, {size.dense_layers} dense layers, {size.params / 1e6:.1f} M params): {per_token:.1f} ms of CPU time per token, "
              f"matrix products {matmul:.1f} ms ({matmul / per_token:.0%}), the rest {per_token - matmul:.1f} ms")
        for key, ms, calls in top:
            print(f"    {key:<40s} {ms:6.2f} ms/token  {calls} calls/token")


if __name__ == "__main__":
    main()

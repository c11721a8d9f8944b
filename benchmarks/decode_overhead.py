"""The per-token overheads of a decode step that are ours to cut, switched off and on in one process:
the decode attention (engine/attention.py: folded grouped heads for one bf16 CPU query, against
transformers' enable_gqa path), the bound kernel calls of the int layers (QWeight.cpu_kernel, against
QWeight.matmul's checks) and the bf16 low-rank layers' decode products through torch.mv
(formats/kernels.bf16_linear, against F.linear). Each row alternates the two settings on the same model.

    .venv/bin/python benchmarks/decode_overhead.py [--formats float32,bfloat16,int8,int4-g32]
        [--size-ratio 0.5] [--prompts 64,256] [--new-tokens 64] [--rounds 3] [--json]
Run it on an idle machine (2 threads).
"""

import argparse

import torch

import common  # noqa: E402  (the repository on sys.path, the shared options)

import torch.nn.functional as F  # noqa: E402

from acip_core.artifacts.open import open_artifact  # noqa: E402
from acip_core.engine import layers  # noqa: E402
from acip_core.engine.attention import NAME  # noqa: E402
from acip_core.evaluation.bench import speed  # noqa: E402
from acip_core.formats.kernels import FLOAT32_ROWS  # noqa: E402


BF16_LINEAR = layers.bf16_linear


def plain_bf16_linear(x, weight, bias=None):
    """bf16_linear as it was: F.linear for few rows whatever the weight's layout."""
    if x.numel() < FLOAT32_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    return BF16_LINEAR(x, weight, bias)


def switch(model, on: bool, saved: dict) -> None:
    """The overheads cut (on) or as transformers' SDPA, QWeight.matmul and F.linear run them (off)."""
    model.config._attn_implementation = NAME if on else "sdpa"
    layers.bf16_linear = BF16_LINEAR if on else plain_bf16_linear
    for m in model.modules():
        for attr in ("_kernel", "_kernels"):
            if attr in m.__dict__:
                saved.setdefault((id(m), attr), m.__dict__[attr])
                m.__dict__[attr] = saved[(id(m), attr)] if on else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_artifact(p)
    common.add_json(p)
    p.add_argument("--formats", default="float32,bfloat16,int8,int4-g32")
    p.add_argument("--size-ratio", type=float, default=0.5)
    p.add_argument("--prompts", default="64,256")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    any_size = open_artifact(args.artifact)
    vocab = len(any_size.tokenizer)
    rows = []
    for key in args.formats.split(","):
        for which, size in (("original", any_size.original_size(key)),
                            (f"{args.size_ratio}", any_size.size_for_ratio(args.size_ratio, key))):
            model, saved = any_size.materialize(size, key), {}
            for prompt in map(int, args.prompts.split(",")):
                ids = torch.randint(100, vocab - 1, (1, prompt), generator=torch.Generator().manual_seed(0))
                runs = {False: [], True: []}
                for on in runs:  # warm-up
                    switch(model, on, saved)
                    speed(model, ids[:, :32], 4)
                for _ in range(args.rounds):
                    for on in runs:
                        switch(model, on, saved)
                        runs[on].append(speed(model, ids, args.new_tokens)["decode_tok_s"])
                before, after = (sorted(runs[on])[len(runs[on]) // 2] for on in (False, True))
                rows.append(dict(format=key, size=which, prompt_tokens=prompt, decode_tok_s_before=before,
                                 decode_tok_s_after=after, speedup=after / before))
                print(f"{key:<10s} {which:<8s} prompt {prompt:4d}: {before:6.1f} -> {after:6.1f} tok/s "
                      f"({after / before:.2f}x)", flush=True)
    if args.json is not None:
        common.write_result("decode_overhead", dict(new_tokens=args.new_tokens, rounds=args.rounds, rows=rows),
                            args.json or None)


if __name__ == "__main__":
    main()

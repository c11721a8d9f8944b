"""Does switching oneDNN off help bf16 decoding on this CPU? Original vs sizes, with and without it.

    .venv/bin/python benchmarks/onednn_switch.py [--artifact DIR]
For each dtype and each setting of torch.backends.mkldnn: prefill and decode tokens/s of sizes 1.0,
0.7, 0.5 (batch 1, KV cache, 256-token prompt, 64 new tokens; best of 2 alternating rounds).
"""

import argparse

import torch

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.evaluation.bench import speed  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    args = parser.parse_args()
    model = open_artifact(args.artifact)
    ids = torch.randint(100, len(model.tokenizer) - 1, (1, 256), generator=torch.Generator().manual_seed(0))
    print(f"{'dtype':9s} {'oneDNN':7s} {'size':>5s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for dtype in ("float32", "bfloat16"):
        nets = {r: model.materialize(model.size_for_ratio(r), dtype) for r in (1.0, 0.7, 0.5)}
        for enabled in (True, False):
            with torch.backends.mkldnn.flags(enabled=enabled):
                for net in nets.values():
                    speed(net, ids[:, :32], 4)  # warm-up
                best = {r: [0.0, 0.0] for r in nets}
                for _ in range(2):
                    for r, net in nets.items():
                        s = speed(net, ids, 64)
                        best[r] = [max(best[r][0], s["prefill_tok_s"]), max(best[r][1], s["decode_tok_s"])]
            for r, (prefill, decode) in best.items():
                print(f"{dtype:9s} {'on' if enabled else 'off':7s} {r:5.1f} {prefill:14.0f} {decode:13.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Every speed figure of the project, each as a ratio to its reference measured in the same run.

    .venv/bin/python benchmarks/speed.py [--artifact precomputed/smollm2-135m-instruct] [--quick]
Prints a table and writes benchmarks/results/speed.json. Figures:
- decode / prefill tokens/s of sizes 0.5, 0.7, 0.9 vs the original (batch 1, KV cache, 256-token prompt,
  128 new tokens; fp32 and bf16; alternating after warm-up)
- perplexity-evaluation throughput at 0.5 vs the original
- any size: threshold search + materialize (median of 100 random ratios), and the threshold search
  alone on a LLaMA-7B-shaped score map
- scoring: seconds per ACIP step vs a plain LoRA (r=32) fine-tuning step, same batch/seq/precision
"""

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import common  # noqa: E402  (the repository on sys.path, the shared options)

from acip_core.evaluation.bench import compare_speed  # noqa: E402
from acip_core.sources.data import load_text, token_windows  # noqa: E402
from acip_core.evaluation.evaluate import perplexity  # noqa: E402
from acip_core.artifacts.open import open_artifact  # noqa: E402


class LoRALinear(torch.nn.Module):
    """The reference for the scoring step: a frozen linear plus a trainable LoRA (r 32, α 16)."""

    def __init__(self, linear, rank=32, alpha=16.0):
        super().__init__()
        self.linear, self.scaling = linear, alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, linear.in_features) / linear.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        self.dropout = torch.nn.Dropout(0.05)

    def forward(self, x):
        return self.linear(x) + F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling


def step_seconds(model, params, ids, amp, steps=4):
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    model.eval()
    return statistics.median(times)


def scoring_step_ratio(batch=2, seq=128):
    from acip_core.engine.basis import build_basis
    from acip_core.sources.models import load_base
    from acip_core.engine.parametrize import acip_layers, parametrize_, replace_modules_, target_linears
    from acip_core.training.score import autocast_dtype

    model, tok = load_base()
    ids = token_windows(tok, load_text("corpus:train"), seq, batch)
    amp = autocast_dtype("auto", torch.device("cpu")) is not None
    linears = target_linears(model)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = {n: LoRALinear(l) for n, l in linears.items()}
    replace_modules_(model, lora)
    t_lora = step_seconds(model, [p for m in lora.values() for p in (m.A, m.B)], ids, amp)
    replace_modules_(model, linears)
    parametrize_(model, build_basis(model, linears, "svd"))
    layers = acip_layers(model)
    if amp:
        for l in layers.values():
            l.weight, l.U, l.Vh = l.weight.bfloat16(), l.U.bfloat16(), l.Vh.bfloat16()
    params = [p for l in layers.values() for p in (l.mask, l.lora_A, l.lora_B)]
    t_acip = step_seconds(model, params, ids, amp)
    return dict(batch=batch, seq_len=seq, bf16_autocast=amp, lora_step_s=t_lora, acip_step_s=t_acip,
                acip_over_lora=t_acip / t_lora)


def any_size_latency(model, n=100):
    rng, total = random.Random(0), []
    model.materialize(model.size_for_ratio(0.5))
    for _ in range(n):
        t = time.perf_counter()
        model.materialize(model.size_for_ratio(rng.uniform(0.3, 1.0)))
        total.append(time.perf_counter() - t)
    return 1e3 * statistics.median(total)


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and sizes")
    args = parser.parse_args()
    model = open_artifact(args.artifact)
    out = {"threads": torch.get_num_threads(), "decode": []}
    sizes = [0.5] if args.quick else [0.5, 0.7, 0.9]
    for dtype in ("float32", "bfloat16"):
        for r in sizes:
            res = compare_speed(model, r, dtype, rounds=2 if args.quick else 3)
            out["decode"].append(res)
            print(f"{dtype:9s} size {r:.1f}: decode {res['decode_speedup']:.2f}x "
                  f"({res['decode_tok_s_compressed']:.1f} vs {res['decode_tok_s_original']:.1f} tok/s), "
                  f"prefill {res['prefill_speedup']:.2f}x", flush=True)
    windows = token_windows(model.tokenizer, load_text("corpus:heldout"), 256, 16)
    full, half = model.materialize(model.full_size()), model.materialize(model.size_for_ratio(0.5))
    perplexity(half, windows[:4])
    tp = {k: statistics.median(perplexity(m, windows)["tokens_per_s"] for _ in range(2))
          for k, m in (("original", full), ("size_0.5", half))}
    out["ppl_eval_tokens_per_s"] = dict(tp, ratio=tp["size_0.5"] / tp["original"])
    print(f"perplexity eval: {tp['size_0.5']:.0f} vs {tp['original']:.0f} tok/s = "
          f"{out['ppl_eval_tokens_per_s']['ratio']:.2f}x", flush=True)
    out["any_size_median_ms"] = any_size_latency(model)
    print(f"any size (search + materialize): median {out['any_size_median_ms']:.1f} ms", flush=True)
    from engine_numbers import llama7b_threshold_ms

    out.update(llama7b_threshold_ms())
    print(f"LLaMA-7B-shaped threshold search: median {out['llama7b_threshold_median_ms']:.2f} ms "
          f"(one-time sort {out['llama7b_sort_once_ms']:.0f} ms)", flush=True)
    out["scoring_step"] = scoring_step_ratio()
    s = out["scoring_step"]
    print(f"scoring step: ACIP {s['acip_step_s']:.2f} s vs LoRA {s['lora_step_s']:.2f} s = "
          f"{s['acip_over_lora']:.2f}x", flush=True)
    common.write_result("speed", out)


if __name__ == "__main__":
    main()

"""Per decoder family (tiny random models built from transformers' config classes, hidden 64, 2 layers:
tests/families.py): what target discovery picks, the share of the model's 2-D weights (and of its
blocks' 2-D weights) that is, and the round trip of tests/test_families.py: score 3 steps → size 0.5 →
export low-rank, dense and int8 → plain AutoModelForCausalLM.from_pretrained in one fresh process →
are the greedy tokens the app's? Prints a Markdown table (no timings).
Run: HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/families.py"""
import json, os, subprocess, sys, tempfile
from pathlib import Path

import torch

import common  # noqa: E402  (the repository on sys.path)
sys.path.insert(0, str(common.ROOT / "tests"))  # the tests' tiny models
import conftest  # noqa: E402
import test_families as tf  # noqa: E402
from families import FAMILIES, tiny_family  # noqa: E402
from acip_core.sources.data import load_text  # noqa: E402
from acip_core.sources.models import load_base  # noqa: E402
from acip_core.engine.parametrize import (DEFAULT_TARGETS, TargetError, decoder_blocks, discover_targets,  # noqa: E402
                                   target_linears, target_names, weight_share)

torch.set_num_threads(1)
d = Path(tempfile.mkdtemp())
tok = conftest._tokenizer(d / "tok")
text = d / "calibration.txt"
text.write_text(load_text("corpus:train")[:60_000], encoding="utf-8")
rows, jobs = {}, []
for family in FAMILIES:
    folder = tiny_family(family, d / family, tok)
    model, _ = load_base(folder)
    try:  # what the seven Llama names (the selection before discovery) took of the blocks' 2-D weights
        before = sum(m.weight.numel() for m in discover_targets(model, DEFAULT_TARGETS).values())
    except TargetError:
        before = 0
    linears = target_linears(model)
    root, blocks = decoder_blocks(model)
    block_2d = sum(p.numel() for p in blocks.parameters() if p.dim() == 2)
    rows[family] = dict(cls=type(model).__name__, names=target_names(linears), layers=len(linears),
                        share=weight_share(model, linears),
                        block_share=sum(m.weight.numel() for m in linears.values()) / block_2d,
                        before=before / block_2d)
    try:
        facts, family_jobs = tf._run_family(family, folder, d / "out" / family, tok, text)
        rows[family].update(facts)
        jobs += family_jobs
    except Exception as e:  # a row says what failed
        rows[family]["error"] = f"{type(e).__name__}: {e}"
manifest = d / "jobs.json"
manifest.write_text(json.dumps([{k: v for k, v in j.items() if k != "want"} for j in jobs]))
proc = subprocess.run([sys.executable, "-c", tf._FRESH, str(manifest)], capture_output=True, text=True,
                      env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
loaded = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
for job in jobs:
    got = loaded.get(job["key"], dict(error=proc.stderr[-300:]))
    family, kind = job["key"].split("/")
    rows[family][kind] = "same tokens" if got.get("tokens") == job["want"] else got.get("error", "tokens differ")

print("| family (class) | targets (discovered) | layers | share of 2-D weights | of the blocks' | "
      "of the blocks' by the Llama names | size 0.5 reached | params / bytes exact | low-rank | dense | int8 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for family, r in rows.items():
    exact = "yes" if r.get("params_exact") and r.get("bytes_exact") else "no"
    print(f"| {family} ({r['cls']}) | {', '.join(r['names'])} | {r['layers']} | {100 * r['share']:.1f} % | "
          f"{100 * r['block_share']:.1f} % | {100 * r['before']:.1f} % | {r.get('size_ratio', float('nan')):.4f} | {exact} | "
          f"{r.get('lowrank', r.get('error'))} | {r.get('dense', '-')} | {r.get('int8', '-')} |")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

for moe in ("mixtral", "qwen2_moe"):
    cfg = AutoConfig.for_model(moe, vocab_size=len(tok), hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                               pad_token_id=0, eos_token_id=1, bos_token_id=1)
    m = AutoModelForCausalLM.from_config(cfg)
    try:
        target_linears(m)
        print(f"| {moe} | discovered | | | | | | | | | |")
    except TargetError as e:
        print(f"| {moe} ({type(m).__name__}) | refused: {str(e).split(';')[0]} | | | | | | | | | |")

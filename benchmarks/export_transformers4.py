"""Exports made with transformers 5 read right by transformers 4.x: a tiny Llama with rope_theta 100000
(like SmolLM2) exported low-rank and dense, then loaded in a fresh process with transformers 4.57 first
on the path; prints the max |logit| difference to the app's model. Setup (outside the venv):
  .venv/bin/python -m pip install --no-deps --target /tmp/tf4 "transformers==4.57.*" "tokenizers==0.22.*" "huggingface_hub==0.36.*"
Run: HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/export_transformers4.py"""
import json, subprocess, sys, tempfile, os
from pathlib import Path
import torch
sys.path.insert(0, "tests")
import conftest
from helpers import random_any_size
from acip_core.export import export_dense, export_lowrank
from transformers import AutoModelForCausalLM, LlamaConfig

d = Path(tempfile.mkdtemp())
tok = conftest._tokenizer(d / "tok")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=100000.0, tie_word_embeddings=True,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
m = AutoModelForCausalLM.from_config(cfg); m.save_pretrained(d / "base"); tok.save_pretrained(d / "base")
a = random_any_size(str(d / "base"))[0]
size = a.size_for_ratio(0.5)
ids = torch.randint(0, len(tok), (1, 64), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = a.materialize(size)(ids).logits
torch.save(dict(ids=ids, ref=ref), d / "ref.pt")
folders = [str(export_lowrank(a, size, d / "lr")), str(export_dense(a, size, d / "dense"))]
code = r'''
import sys, json, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
r = torch.load(sys.argv[2])
for folder in json.loads(sys.argv[1]):
    remote = "lr" in folder.rsplit("/", 1)[-1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    with torch.no_grad():
        diff = (model(r["ids"]).logits - r["ref"]).abs().max().item()
    print(transformers.__version__, folder.rsplit("/", 1)[-1], type(tokenizer).__name__,
          getattr(model.config, "rope_theta", None), "max |logit diff|", diff)
'''
env = dict(os.environ, PYTHONPATH="/tmp/tf4", HF_HUB_OFFLINE="1", HF_HOME=str(d / "hf"))
p = subprocess.run([sys.executable, "-c", code, json.dumps(folders), str(d / "ref.pt")], env=env,
                   capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
print(p.stdout, p.stderr[-1500:] if p.returncode else "")

"""An any-size folder made with transformers 5 read by transformers 4.x: a tiny wide Llama (int4 layers
factorize) exported any-size in float32, loaded in a fresh process with transformers 4.57 first on the
path; at three sizes in every format prints the max |logit| difference to the app's model (0.0: the
same numbers). Setup (outside the venv):
  .venv/bin/python -m pip install --no-deps --target /tmp/tf4 "transformers==4.57.*" "tokenizers==0.22.*" "huggingface_hub==0.36.*"
Run: HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/anysize_transformers4.py [--tf4 /tmp/tf4]"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import common  # noqa: E402  (the repository on sys.path)
sys.path.insert(0, str(common.ROOT / "tests"))  # the tests' tiny models
import conftest  # noqa: E402
from helpers import random_any_size  # noqa: E402

from acip_core.export.anysize import export_anysize  # noqa: E402

SIZES, FORMATS = (0.5, 0.8, 1.0), ("float32", "bfloat16", "int8", "float8", "int4-g32")
parser = argparse.ArgumentParser()
parser.add_argument("--tf4", default="/tmp/tf4")
args = parser.parse_args()
d = Path(tempfile.mkdtemp())
tok = conftest._tokenizer(d / "tok")
base = conftest._tiny("llama", d / "base", tok, tie_word_embeddings=True, hidden_size=128, intermediate_size=256,
                      rope_theta=100000.0)
a = random_any_size(base)[0]
ids = torch.randint(0, len(tok), (1, 48), generator=torch.Generator().manual_seed(1))
ref = {}
with torch.no_grad():
    for f in FORMATS:
        for r in SIZES:
            ref[f"{f}@{r}"] = a.materialize(a.size_for_ratio(r, f), f)(ids).logits.float()
torch.save(dict(ids=ids, ref=ref), d / "ref.pt")
folder = export_anysize(a, d / "anysize")
code = r'''
import sys, json, torch, transformers
from transformers import AutoModelForCausalLM
r = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, size_ratio=0.5, format="int4").eval()
print(transformers.__version__, "loaded at", model.acip_size["format"], round(model.acip_size["size_ratio"], 4))
for key, want in r["ref"].items():
    fmt, size = key.split("@")
    model.set_size(float(size), fmt)
    with torch.no_grad():
        print(key, "max |logit diff|", (model(r["ids"]).logits.float() - want).abs().max().item())
'''
env = dict(os.environ, PYTHONPATH=args.tf4, HF_HUB_OFFLINE="1", HF_HOME=str(d / "hf"))
p = subprocess.run([sys.executable, "-c", code, str(folder), str(d / "ref.pt")], env=env, capture_output=True,
                   text=True, stdin=subprocess.DEVNULL, timeout=600)
print(p.stdout, p.stderr[-2500:] if p.returncode else "")

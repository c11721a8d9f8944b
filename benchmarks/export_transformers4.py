"""Exports read by transformers 5.x and 4.x: a tiny Llama (128 wide, tied embeddings, rope_theta 100000 like
SmolLM2) exported at 0.5 in every kind (low-rank float32, bfloat16, int8, int4-g32+emb8; dense float32,
bfloat16), then loaded in one fresh process per major, once with a plain from_pretrained (no dtype: 4.x's
default is float32) and once as the model card says (dtype="auto"); prints the dtype the model got and
the max |logit diff| to the app's model (a dense export: to itself loaded in this process), or the error.
Setup: make venv (transformers 4.57 in .venv-tf4, beside this venv's torch).
Run: HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/export_transformers4.py"""
import json, os, subprocess, sys, tempfile
from pathlib import Path
import torch
import common  # noqa: E402  (the repository on sys.path)
sys.path.insert(0, str(common.ROOT / "tests"))  # the tests' tiny models
import conftest
from helpers import random_any_size
from acip_core.export.sized import export_dense, export_lowrank
from transformers import AutoModelForCausalLM

d = Path(tempfile.mkdtemp())
tok = conftest._tokenizer(d / "tok")
base = conftest._tiny("llama", d / "base", tok, tie_word_embeddings=True, hidden_size=128, intermediate_size=256,
                      rope_theta=100000.0)
a = random_any_size(base)[0]
ids = torch.randint(0, len(tok), (1, 64), generator=torch.Generator().manual_seed(1))
cases = {}
for name, key, dense in [("lowrank-float32", "float32", False), ("lowrank-bfloat16", "bfloat16", False),
                         ("lowrank-int8", "int8", False), ("lowrank-int4-g32+emb8", "int4-g32+emb8", False),
                         ("dense-float32", "float32", True), ("dense-bfloat16", "bfloat16", True)]:
    size = a.size_for_ratio(0.5, key)
    folder = (export_dense if dense else export_lowrank)(a, size, d / name, format=key)
    app = a.materialize(size, key)
    if dense:
        app = AutoModelForCausalLM.from_pretrained(folder, dtype=app.dtype).eval()
    with torch.no_grad():
        torch.save(dict(ids=ids, ref=app(ids).logits.float()), d / f"{name}.pt")
    cases[str(folder)] = dict(ref=str(d / f"{name}.pt"), remote=not dense)
code = r'''
import sys, json, torch, transformers
from transformers import AutoModelForCausalLM
for folder, case in json.loads(sys.argv[1]).items():
    r = torch.load(case["ref"])
    for how, kw in (("plain", {}), ("dtype=auto", {"dtype": "auto"})):
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=case["remote"], **kw).eval()
            with torch.no_grad():
                diff = (model(r["ids"]).logits.float() - r["ref"]).abs().max().item()
            out = dict(dtype=str(next(model.parameters()).dtype), max_abs_logit_diff=diff)
        except Exception as err:
            out = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
        print(json.dumps(dict(transformers=transformers.__version__, export=folder.rsplit("/", 1)[-1], load=how, **out)))
'''
for pythonpath in ("", ".venv-tf4"):
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", HF_HOME=str(d / f"hf{pythonpath}"),
               TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=900)
    print(p.stdout, p.stderr[-1500:] if p.returncode else "", flush=True)

"""Every kind of export (low-rank float32, bfloat16, int8, int4-g32+emb8; dense float32 and bfloat16) of
one tiny model runs its model card's snippet unmodified — the exact text of the ```python block of the
written README.md — in a fresh process, under transformers 5.x (this venv) and 4.x (`.venv-tf4`, made by
`make venv`; skipped where it is missing), in the export's own dtype, and gives the app's reply, logits
and greedy tokens (a dense export: its own, loaded here, which are the app's to the product's rounding).
One fresh process per major loads all six."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from acip_core.evaluation.evaluate import REPETITION_PENALTY
from acip_core.export.sized import export_dense, export_lowrank
from acip_core.formats.registry import parse_format
from helpers import random_any_size, random_ids

ROOT = Path(__file__).resolve().parents[1]
TF4 = ROOT / ".venv-tf4"  # transformers 4.x beside this venv's torch (Makefile, target venv)
CARD_FOLDER = "path/to/this/folder"  # what the card's snippet names; each case runs where it exists
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
# (name, format key, dense)
KINDS = [("lowrank-float32", "float32", False), ("lowrank-bfloat16", "bfloat16", False),
         ("lowrank-int8", "int8", False), ("lowrank-int4", "int4-g32+emb8", False),
         ("dense-float32", "float32", True), ("dense-bfloat16", "bfloat16", True)]

CHILD = textwrap.dedent(r"""
    import contextlib, io, json, os, sys
    import torch, transformers
    cases = json.loads(sys.argv[1])
    for case in cases:
        os.chdir(case["dir"])
        printed = io.StringIO()
        scope = {}
        with contextlib.redirect_stdout(printed):
            exec(case["code"], scope)  # the card's text, unmodified
        model = scope["model"]
        ref = torch.load(case["ref"])
        with torch.no_grad():
            logits = model(ref["ids"]).logits.float()
            tokens = model.generate(ref["prompt"], attention_mask=torch.ones_like(ref["prompt"]),
                                    max_new_tokens=16, pad_token_id=0)[0, ref["prompt"].shape[1]:]
        print(json.dumps(dict(name=case["name"], transformers=transformers.__version__,
                              dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                              reply=printed.getvalue(), diff=(logits - ref["logits"]).abs().max().item(),
                              tokens=tokens.tolist())))
""")


def card_code(folder: Path) -> str:
    """The ```python block of the export's README.md, exactly as written."""
    match = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(encoding="utf-8"), re.S)
    assert match, "the model card has no python snippet"
    return match.group(1)


@pytest.fixture(scope="module")
def exports(tiny_llama_wide, tmp_path_factory):
    """The six exports of one size, each at <case>/path/to/this/folder, with the app's numbers."""
    root = tmp_path_factory.mktemp("compat")
    base = root / "base"
    shutil.copytree(tiny_llama_wide, base)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHAT_TEMPLATE  # the card's snippet applies the chat template
    tok.save_pretrained(base)
    any_size = random_any_size(str(base))[0]
    ids = random_ids(len(any_size.tokenizer), (1, 24), seed=7)
    cases = []
    for name, key, dense in KINDS:
        fmt = parse_format(key)
        size = any_size.size_for_ratio(0.5, fmt)
        folder = root / name / CARD_FOLDER
        (export_dense if dense else export_lowrank)(any_size, size, folder, format=key)
        code = card_code(folder)
        messages = eval(re.search(r"^messages = (.*)$", code, re.M).group(1))  # noqa: S307  (our own card)
        app = any_size.materialize(size, fmt)
        if dense:  # the app runs the factors, a dense export their product: its own numbers, loaded here
            from transformers import AutoModelForCausalLM

            dense_model = AutoModelForCausalLM.from_pretrained(folder, dtype=app.dtype).eval()
            with torch.no_grad():
                gap = (dense_model(ids).logits.float() - app(ids).logits.float()).abs().max().item()
            assert gap <= (1e-4 if key == "float32" else 0.1), (name, gap)  # rounding of the product only
            app = dense_model
        chat = any_size.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
        with torch.no_grad():
            out = app.generate(input_ids=chat["input_ids"], attention_mask=chat["attention_mask"], max_new_tokens=64,
                               do_sample=False, repetition_penalty=REPETITION_PENALTY, pad_token_id=0)
            reply = any_size.tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
            tokens = app.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=16,
                                  do_sample=False, repetition_penalty=REPETITION_PENALTY, pad_token_id=0)
            ref = dict(ids=ids, prompt=ids[:, :8], logits=app(ids).logits.float())
        torch.save(ref, root / f"{name}.pt")
        cases.append(dict(name=name, dir=str(root / name), code=code, ref=str(root / f"{name}.pt"),
                          app_reply=reply, app_tokens=tokens[0, 8:].tolist(), compute=str(app.dtype).replace("torch.", "")))
    return root, cases


def _run(cases, root, pythonpath=None):
    env = dict(os.environ, HF_HOME=str(root / f"hf-{bool(pythonpath)}"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    child = [{k: c[k] for k in ("name", "dir", "code", "ref")} for c in cases]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child)], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL, env=env, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]


def _check(results, cases, major):
    assert [r["name"] for r in results] == [c["name"] for c in cases]
    for r, c in zip(results, cases):
        assert r["transformers"].split(".")[0] == major, r
        # loaded exactly as the card says: in the export's own dtype (quantized: bf16 around the kernels)
        assert r["dtype"] == c["compute"], (r["name"], r["dtype"], c["compute"])
        assert r["reply"] == c["app_reply"] + "\n", (r["name"], r["reply"], c["app_reply"])
        assert r["tokens"] == c["app_tokens"], r["name"]
        # low-rank: the app's very tensors and products; dense: the same folder loaded in this process
        assert r["diff"] == 0.0, (r["name"], r["diff"])


def test_cards_snippet_runs_unmodified_with_the_apps_numbers_in_transformers_5(exports):
    root, cases = exports
    _check(_run(cases, root), cases, "5")


@pytest.mark.skipif(not (TF4 / "transformers").is_dir(), reason="no .venv-tf4 (make venv installs transformers 4.x there)")
def test_cards_snippet_runs_unmodified_with_the_apps_numbers_in_transformers_4(exports):
    root, cases = exports
    _check(_run(cases, root, TF4), cases, "4")

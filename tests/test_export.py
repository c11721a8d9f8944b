import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from acip_core.export.folder import TEMPLATE, zip_folder
from acip_core.export.sized import export_dense, export_lowrank
from acip_core.engine.layers import LowRankLinear
from acip_core.engine.materialize import count_params
from helpers import random_any_size, random_ids


def _load(folder, remote=True, dtype=torch.float32):
    kw = dict(trust_remote_code=True) if remote else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kw).eval()


def _greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, repetition_penalty=1.0, pad_token_id=0)


def _data_bytes(path):
    """Bytes of tensor data in a safetensors file (the file minus its JSON header)."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header


@pytest.fixture
def any_size(tiny_model_dir):
    return random_any_size(tiny_model_dir)[0]


def test_lowrank_export_reloads_offline_with_the_same_logits_and_tokens(any_size, tmp_path):
    size = any_size.size_for_ratio(0.5)
    out = export_lowrank(any_size, size, tmp_path / "lowrank", card=dict(perplexity=12.345, artifact="tiny"))
    assert {"config.json", "model.safetensors", "modeling_acip.py", "generation_config.json", "README.md",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert (out / "modeling_acip.py").read_bytes() == TEMPLATE.read_bytes()
    assert "acip_core" not in (out / "modeling_acip.py").read_text()
    config = json.loads((out / "config.json").read_text())
    base_type = any_size.base.config.model_type
    assert config["model_type"] == f"acip_lowrank_{base_type}" and config["acip_base_model_type"] == base_type
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    materialized = any_size.materialize(size)
    factorized = {n: m.rank for n, m in materialized.named_modules() if isinstance(m, LowRankLinear)}
    assert factorized and config["acip_ranks"] == factorized  # only the low-rank layers, LoRA rank included
    assert all(r >= any_size.lora_rank for r in factorized.values())

    loaded = _load(out)
    assert type(loaded).__name__ == f"ACIPForCausalLM__{base_type}"
    assert sum(p.numel() for p in loaded.parameters()) == count_params(materialized) == size.params
    lowrank = {n: m for n, m in loaded.named_modules() if type(m).__name__ == "LowRankLinear"}
    assert {n: m.down.weight.shape[0] for n, m in lowrank.items()} == factorized
    ids = random_ids(len(any_size.tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, materialized(ids).logits, atol=1e-5, rtol=1e-5)
    prompt = ids[:1, :8]
    assert torch.equal(_greedy(loaded, prompt), _greedy(materialized, prompt))

    readme = (out / "README.md").read_text()
    assert f"{size.size_ratio:.4f}" in readme and "12.345" in readme and "trust_remote_code=True" in readme
    assert f"{size.params:,}" in readme and "ACIP" in readme and "`tiny`" in readme


def test_safetensors_shrinks_in_proportion_to_params(any_size, tmp_path):
    half, full = any_size.size_for_ratio(0.5), any_size.size_for_ratio(1.0)
    a = export_lowrank(any_size, half, tmp_path / "half")
    b = export_lowrank(any_size, full, tmp_path / "full")
    bytes_half, bytes_full = (_data_bytes(f / "model.safetensors") for f in (a, b))
    assert bytes_half == 4 * half.params and bytes_full == 4 * full.params
    assert (a / "model.safetensors").stat().st_size < (b / "model.safetensors").stat().st_size
    assert json.loads((b / "config.json").read_text())["acip_ranks"] == {}  # 1.0 is the base model
    loaded = _load(b)
    ids = random_ids(len(any_size.tokenizer))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, any_size.base(ids).logits)


def test_bfloat16_lowrank_export_holds_the_bfloat16_numbers(tiny_llama, tmp_path):
    any_size = random_any_size(tiny_llama)[0]
    size = any_size.size_for_ratio(0.6)
    out = export_lowrank(any_size, size, tmp_path / "bf16", format="bfloat16")
    assert _data_bytes(out / "model.safetensors") == 2 * size.params
    loaded = _load(out, dtype=torch.bfloat16)
    ids = random_ids(len(any_size.tokenizer))
    app = any_size.materialize(size, "bfloat16")
    with torch.no_grad():  # the export multiplies the same tensors in the same layout as the app
        assert torch.equal(loaded(ids).logits, app(ids).logits)
    assert torch.equal(_greedy(loaded, ids[:1, :8], 24), _greedy(app, ids[:1, :8], 24))


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose lm_head is its embedding, like the embedded SmolLM2."""
    from transformers import LlamaConfig

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, eos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tied")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("dense", [False, True])
def test_tied_embeddings_are_stored_once_and_tied_back(tied_llama, tmp_path, dense):
    from safetensors import safe_open

    any_size = random_any_size(tied_llama)[0]
    size = any_size.size_for_ratio(0.5)
    out = (export_dense if dense else export_lowrank)(any_size, size, tmp_path / "tied")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = _load(out, remote=not dense)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = random_ids(len(any_size.tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, any_size.materialize(size)(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_dense_export_loads_without_remote_code(any_size, tmp_path):
    size = any_size.size_for_ratio(0.5)
    out = export_dense(any_size, size, tmp_path / "dense")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "acip_ranks" not in config
    assert config["model_type"] == any_size.base.config.model_type
    assert not (out / "modeling_acip.py").exists()
    loaded = _load(out, remote=False)
    assert type(loaded) is type(any_size.base)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in any_size.base.parameters())
    materialized = any_size.materialize(size)
    ids = random_ids(len(any_size.tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, materialized(ids).logits, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :8]
    assert torch.equal(_greedy(loaded, prompt), _greedy(materialized, prompt))
    assert "trust_remote_code" not in (out / "README.md").read_text()


def test_zip_refuses_paths_outside_the_base(tiny_llama, tmp_path):
    any_size = random_any_size(tiny_llama)[0]
    folder = export_lowrank(any_size, 0.5, tmp_path / "exports" / "m")
    base = tmp_path / "exports"
    target = zip_folder(folder, "m.zip", base)
    assert target == (base / "m.zip").resolve()
    with zipfile.ZipFile(target) as zf:
        names = set(zf.namelist())
        assert {"m/config.json", "m/model.safetensors", "m/modeling_acip.py", "m/README.md"} <= names
        assert zf.read("m/config.json") == (folder / "config.json").read_bytes()
    outside = tmp_path / "elsewhere.zip"
    (base / "link").symlink_to(tmp_path, target_is_directory=True)
    for bad in ("../x.zip", "sub/../../x.zip", str(outside), "/etc/x.zip", "link/x.zip"):
        with pytest.raises(ValueError, match="refusing"):
            zip_folder(folder, bad, base)
    with pytest.raises(ValueError, match="inside the folder"):
        zip_folder(folder, "m/self.zip", base)
    assert not outside.exists() and not (tmp_path / "x.zip").exists()
    assert not [p for p in base.iterdir() if p.name.endswith(".tmp")]


def test_refuses_to_overwrite_a_foreign_folder_but_replaces_an_export(tiny_llama, tmp_path):
    any_size = random_any_size(tiny_llama)[0]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for fn in (export_lowrank, export_dense):
        with pytest.raises(FileExistsError, match="not a previous ACIP export"):
            fn(any_size, 0.5, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_lowrank(any_size, 0.5, tmp_path / "file")

    empty = tmp_path / "empty"
    empty.mkdir()
    export_lowrank(any_size, 0.5, empty)
    export_dense(any_size, 0.7, empty)  # a previous export is replaced as a whole
    assert not (empty / "modeling_acip.py").exists()
    assert json.loads((empty / "acip_export.json").read_text())["kind"] == "dense"
    assert "acip_export" not in json.loads((empty / "config.json").read_text())  # a re-save does not carry it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine"]  # no temp leftovers


def test_cli_export(tiny_llama, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from acip_core.cli import main

    any_size = random_any_size(tiny_llama)[0]
    curve = pd.DataFrame(dict(method=["original", "acip", "acip"], size_ratio=[1.0, 0.4, 0.6],
                              ppl_heldout=[10.0, 40.0, 20.0]))
    import acip_core.cli

    monkeypatch.setattr(acip_core.cli, "_open_method_size",  # the folder "art" stands for any_size
                        lambda args: (any_size, any_size.size_for_ratio(args.size_ratio, acip_core.cli._format(args))))
    monkeypatch.setattr(acip_core.cli, "_curve_of", lambda folder: curve)  # cli's own seam: no library module patched
    out = tmp_path / "cli"
    assert main(["export", "--artifact", "art", "--size-ratio", "0.5", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "lowrank" and result["out"] == str(out) and result["size_ratio"] >= 0.5
    assert (out / "modeling_acip.py").exists()
    card = (out / "README.md").read_text()  # the quality comes from the artifact's curve
    assert "perplexity" in card and "artifact's curve" in card and "| 10.000 |" in card
    assert main(["export", "--artifact", "art", "--size-ratio", "0.5", "--out", str(out), "--dense",
                 "--format", "bfloat16", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["kind"] == "dense" and result["format"] == "bfloat16"
    assert "%|" not in captured.err  # no progress bars under --json
    assert result["params"] == sum(p.numel() for p in any_size.base.parameters()) > result["runtime_params"]
    assert main(["export", "--artifact", "art", "--size-ratio", "0.5", "--out", str(tmp_path), "--json"]) == 2
    assert "not a previous ACIP export" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


def test_export_folder_is_portable(tied_llama, tmp_path):
    """What a user who downloads an export meets: readable files, the app's generation settings,
    a config transformers 4.x reads right (rope_theta), no machine paths, a licence, a card whose
    snippet never stops to ask about remote code, and a dense card that says it saves nothing."""
    from acip_core.export.folder import GENERATION

    any_size = random_any_size(tied_llama)[0]
    for dense in (False, True):
        out = (export_dense if dense else export_lowrank)(any_size, 0.5, tmp_path / f"e{dense}")
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == \
            {p.name: "0o644" for p in out.iterdir()}
        zip_path = zip_folder(out, tmp_path / f"e{dense}.zip")
        with zipfile.ZipFile(zip_path) as zf:
            assert all((info.external_attr >> 16) & 0o777 == 0o644 for info in zf.infolist())
        generation = json.loads((out / "generation_config.json").read_text())
        assert generation["repetition_penalty"] == GENERATION["repetition_penalty"] and not generation.get("do_sample")
        config = json.loads((out / "config.json").read_text())
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
        assert "/" not in config["_name_or_path"] or not os.path.exists(config["_name_or_path"])
        assert str(tmp_path) not in (out / "config.json").read_text()
        tok = json.loads((out / "tokenizer_config.json").read_text())
        assert not {"local_files_only", "is_local"} & set(tok) and tok["tokenizer_class"] == "PreTrainedTokenizerFast"
        card = (out / "README.md").read_text()
        assert "license:" in card.split("---")[1]
        assert ("for compatibility, no memory saved" in card) == dense
        if not dense:
            assert "AutoTokenizer.from_pretrained(folder, trust_remote_code=True)" in card


_AS_CARD_SAYS = r"""
import json, re, sys
import torch
ids = torch.tensor([json.loads(sys.argv[2])])
for folder in json.loads(sys.argv[1]):
    card = open(folder + "/README.md").read()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    exec(code.split("messages =")[0].replace('"path/to/this/folder"', repr(folder)))  # model, tokenizer
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, pad_token_id=0)
    print(json.dumps(out[0, ids.shape[1]:].tolist()))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exports_load_as_their_card_says_in_a_fresh_process_by_another_uid(tied_llama, dtype):
    """Each kind of export, loaded in a new process exactly as its card says (stdin closed: a
    trust_remote_code question would fail it), by another uid where we can switch to one, gives
    the app's greedy tokens with the settings it carries (generation_config.json)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    any_size = random_any_size(tied_llama)[0]
    size = any_size.size_for_ratio(0.5)
    prompt = random_ids(len(any_size.tokenizer), (1, 8), seed=3)
    with torch.no_grad():
        app = any_size.materialize(size, dtype).generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
            repetition_penalty=1.15, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    root = Path(tempfile.mkdtemp(prefix="acip-export-uid-"))
    try:
        root.chmod(0o777)  # the other uid writes its HF module cache here
        as_other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
            if os.geteuid() == 0 and shutil.which("setpriv") else []
        folders = [str((export_dense if dense else export_lowrank)(any_size, size, root / f"m-{dense}", format=dtype))
                   for dense in (False, True)]
        env = dict(os.environ, HF_HOME=str(root / "hf"), HOME=str(root), HF_HUB_OFFLINE="1")
        proc = subprocess.run(as_other + [sys.executable, "-c", _AS_CARD_SAYS, json.dumps(folders),
                                          json.dumps(prompt[0].tolist())],
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lowrank, dense = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
        assert lowrank == app and dense == app, dtype
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""A local .gguf as --model: converted once to a cached safetensors folder keyed by the file."""

import json
import os
import shutil

import pytest
import torch

from acip_core.sources import models
from acip_core.sources.models import EMBEDDED, ModelSourceError, embedded_gguf, gguf_key, load_base
from acip_core.engine.parametrize import target_linears


@pytest.mark.embedded
def test_the_embedded_gguf_given_as_a_path_loads_as_the_embedded_model(tmp_path, monkeypatch):
    reference, _ = load_base(EMBEDDED)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight")
    want = {n: reference.get_parameter(n).detach().clone() for n in names}
    del reference
    gguf = tmp_path / "copy" / "smol.gguf"  # a copy elsewhere: any path, not the wheel's
    gguf.parent.mkdir()
    shutil.copyfile(embedded_gguf(), gguf)
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    model, tok = load_base(str(gguf))
    assert type(model).__name__ == "LlamaForCausalLM" and len(target_linears(model)) == 210
    for n in names:
        assert torch.equal(model.get_parameter(n), want[n])
    assert tok("Debian").input_ids
    folder = tmp_path / "cache" / "models" / gguf_key(gguf)
    assert (folder / "model.safetensors").is_file() and not list(folder.parent.glob("*.tmp"))

    def no_conversion(*a):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    load_base(str(gguf))  # the cache is used
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten file is another model
    assert gguf_key(gguf) != folder.name
    with pytest.raises(AssertionError, match="converted again"):
        load_base(str(gguf))


def test_a_file_that_is_no_gguf_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="broken.gguf: transformers cannot read this GGUF"):
        load_base(str(bad))
    assert not list((tmp_path / "cache" / "models").glob("*"))  # nothing half-written stays
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file; give a model directory, a .gguf file"):
        load_base(str(other))
    with pytest.raises(ModelSourceError, match="no such GGUF file"):
        load_base(str(tmp_path / "missing" / "model.gguf"))


def _write_gguf(model, tokenizer, path):
    """`model` (a Qwen2) and its byte-level BPE tokenizer as a float32 GGUF, written with the gguf
    package under llama.cpp's names (gguf.get_tensor_name_map)."""
    import json

    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tokenizer.eos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_tiny_gguf_written_with_the_gguf_package_loads_with_the_same_logits_and_tokens(
        tiny_qwen, tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from helpers import random_ids

    pytest.importorskip("gguf")
    source = AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    path = tmp_path / "tiny-qwen2.gguf"
    _write_gguf(source, tiny_tokenizer, path)
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    model, tok = load_base(str(path))
    assert type(model).__name__ == "Qwen2ForCausalLM" and len(target_linears(model)) == 14
    ids = random_ids(len(tiny_tokenizer))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)
    text = "The handbook says: install the package"
    assert tok(text).input_ids == tiny_tokenizer(text).input_ids


def test_a_gguf_gets_a_memory_plan_before_it_is_loaded_or_converted(tiny_qwen, tiny_tokenizer, tmp_path,
                                                                      monkeypatch, capsys):
    """The memory plan reads a .gguf's config from its header (nothing converted), so `plan` and the
    plan that `score` and the app's Score tab check first accept every source load_base accepts."""
    from transformers import AutoModelForCausalLM

    from acip_core import cli
    from acip_core.sources.models import load_config
    from acip_core.training.plan import plan_scoring

    pytest.importorskip("gguf")
    path = tmp_path / "tiny-qwen2.gguf"
    _write_gguf(AutoModelForCausalLM.from_pretrained(tiny_qwen), tiny_tokenizer, path)
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    config = load_config(str(path))
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    want = plan_scoring(str(tiny_qwen), probe=False).to_dict()
    got = plan_scoring(str(path), probe=False).to_dict()
    assert got["phases"] == want["phases"] and got["shapes"] == want["shapes"]
    load_base(str(path))  # converted: the plan now reads the cached folder's config.json
    assert plan_scoring(str(path), probe=False).to_dict()["phases"] == want["phases"]
    assert cli.main(["plan", "--model", str(path), "--no-probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(path)
    with pytest.raises(ModelSourceError, match="no such GGUF file"):
        load_config(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="cannot read this GGUF's config"):
        load_config(str(bad))


def test_a_hub_id_whose_cache_holds_only_its_config_goes_on_to_download(tmp_path, monkeypatch):
    """A memory plan fetches a hub id's config.json alone; the run that follows must not take that
    partial copy for the model (transformers raises ValueError for the missing tokenizer), but try the
    hub, and offline say so."""
    from transformers import LlamaConfig

    from acip_core.sources.models import load_config

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                vocab_size=100).save_pretrained(repo / "snapshots" / "abc123")
    assert load_config("someone/tiny").num_hidden_layers == 1
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_base("someone/tiny")


def test_a_sharded_conversion_counts_as_cached(tmp_path, monkeypatch):
    """A model over ~12.5 B parameters is saved in shards (model.safetensors.index.json, no
    model.safetensors): its conversion is found, not redone (and renamed onto itself) at every load."""
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "big.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "cache" / "models" / gguf_key(gguf)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    def converted_again(*a):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", converted_again)
    with pytest.raises(AssertionError, match="converted again"):
        models.gguf_folder(gguf)  # config alone: not complete
    (target / "model.safetensors.index.json").write_text("{}")
    assert models.gguf_folder(gguf) == target


def test_a_local_source_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """An artifact names its base model for every later command, run from any directory: a relative
    path would read there as a hub id ('not in the local Hugging Face cache')."""
    from acip_core.sources.models import recorded_source

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert recorded_source("models/tiny") == str(tmp_path / "models" / "tiny")
    assert recorded_source("./models/tiny") == str(tmp_path / "models" / "tiny")
    assert recorded_source("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # no such folder here
    assert recorded_source(EMBEDDED) == EMBEDDED

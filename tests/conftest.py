"""Tiny random causal LMs built in code (Llama and Qwen2, which has q/k/v biases) and a tokenizer."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from acip_core.sources.data import load_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("corpus:handbook")[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def _tiny(kind, folder, tokenizer, **extra):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    common.update(extra)
    config = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-zero biases, so a bias that is dropped or doubled shows up
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer):
    return _tiny("llama", tmp_path_factory.mktemp("llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory, tiny_tokenizer):
    """Input embeddings and LM head are one tensor, as in SmolLM2."""
    return _tiny("llama", tmp_path_factory.mktemp("llama-tied"), tiny_tokenizer, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama_wide(tmp_path_factory, tiny_tokenizer):
    """Wide enough (128 / 256) that int4 layers, kept in whole groups of 32, still run factorized."""
    return _tiny("llama", tmp_path_factory.mktemp("llama-wide"), tiny_tokenizer, tie_word_embeddings=True,
                 hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, tiny_tokenizer):
    return _tiny("qwen2", tmp_path_factory.mktemp("qwen2"), tiny_tokenizer)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dir(request, tiny_llama, tiny_qwen):
    return tiny_llama if request.param == "llama" else tiny_qwen


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_llama):
    """A short real scoring run on the tiny Llama that reaches its stop ratio. Its LoRA has rank 2, so
    its sizes are different models: at 0.4 and 0.7 some layers run factorized at different ranks (a
    rank-32 LoRA would make every layer of a 32-wide model run dense at every size, and a size mix-up
    could not show)."""
    from helpers import score_tiny

    return score_tiny(tiny_llama, tmp_path_factory.mktemp("art") / "tiny", curve_sizes=[0.4, 0.7, 1.0])


@pytest.fixture(autouse=True)
def _no_call_charge_on_tiny_models(request, monkeypatch):
    """A tiny model's layers hold a few KB, far below an int format's per-call charge (~100 KB,
    `Format.call_bytes`), so with it every int layer would run dense and no test would reach the
    quantized low-rank form: tests on tiny models run without it; real shapes (the shipped
    artifact, tests/test_smollm2.py and test_prune's charge test) keep it."""
    from acip_core.formats import registry as formats
    from acip_core.engine.prune import LayerShape

    if any(name.startswith("tiny_") for name in request.fixturenames):
        monkeypatch.setattr(formats, "CALL_BYTES", 0)
    LayerShape.format_bytes.cache_clear()  # its entries depend on the charge
    yield
    LayerShape.format_bytes.cache_clear()

"""The memory plan (acip_core/training/plan.py): exact counts on the meta device, a measured peak within the
stated error, refusals that name both numbers and create nothing, and a hub id that fails fast."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig

from acip_core.training import plan as plan_mod
from acip_core.sources.models import load_config
from acip_core.training.plan import PlanRefused, check_fits, plan_scoring, trace_step

# The plan's error against a measured peak RSS of a tiny model's scoring steps: benchmarks/RESULTS.md,
# "Memory plan" (there the runtime term, measured with SmolLM2's tokenizer and corpus:broad, is most of it).
TINY_PLAN_ERROR = 0.25


def _parametrized(model, meta: bool):
    from acip_core.engine.basis import build_basis, meta_basis
    from acip_core.engine.parametrize import acip_layers, parametrize_, target_linears

    linears = target_linears(model)
    basis = meta_basis(linears) if meta else build_basis(model, linears, "svd")
    with torch.device("meta" if meta else "cpu"):
        parametrize_(model, basis)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in acip_layers(model).values():
        for p in (layer.mask, layer.lora_A, layer.lora_B):
            p.requires_grad_(True)
    return model


def test_the_meta_count_of_saved_activations_is_the_real_one(tiny_model_dir):
    """One forward on the meta device counts exactly the bytes a real CPU step saves for its backward."""
    from transformers import AutoModelForCausalLM

    from acip_core.training.train import vocab_loss

    real = _parametrized(AutoModelForCausalLM.from_pretrained(tiny_model_dir), meta=False)
    frozen = {t.untyped_storage().data_ptr() for t in list(real.parameters()) + list(real.buffers())}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, real.config.vocab_size, (3, 40))
    real.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_loss(real(input_ids=ids).logits[:, :-1], ids[:, 1:])
    measured = sum(n for ptr, n in storages.items() if ptr not in frozen)
    meta = _parametrized(plan_mod.meta_model(load_config(tiny_model_dir)), meta=True)
    assert trace_step(meta, 3, 40, None)["saved"] == measured


def test_the_plan_counts_what_the_scoring_form_holds(tiny_qwen):
    from transformers import AutoModelForCausalLM

    from acip_core.engine.parametrize import acip_layers, target_linears

    real = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    targets = target_linears(real)
    plan = plan_scoring(tiny_qwen, 2, 32, probe=False)
    assert plan.shapes["target_params"] == sum(m.weight.numel() for m in targets.values())
    assert plan.shapes["params"] == sum(p.numel() for p in real.parameters())
    layers = acip_layers(_parametrized(real, meta=False))
    assert plan.shapes["factor_values"] == sum(l.U.numel() + l.s.numel() + l.Vh.numel() for l in layers.values())
    assert plan.shapes["trainables"] == sum(l.mask.numel() + l.lora_A.numel() + l.lora_B.numel()
                                            for l in layers.values())
    terms = {t.name: t for t in plan.terms}
    assert terms["masks + LoRA + grads + AdamW"].bytes == 16 * plan.shapes["trainables"]
    # bigger batches hold more; a quantized base holds less per step; FSDP over 2 halves the frozen tensors
    assert plan_scoring(tiny_qwen, 4, 32, probe=False).needed("ram") > plan.needed("ram")
    steps = lambda p: p.phase_bytes("ram")["steps"]  # noqa: E731
    wide = plan_scoring(tiny_qwen, 2, 32, base_format="int8", probe=False)
    assert steps(wide) < steps(plan)
    sharded = plan_scoring(tiny_qwen, 2, 32, fsdp=2, probe=False)
    assert steps(sharded) < steps(plan)
    with pytest.raises(ValueError, match="divide"):
        plan_scoring(tiny_qwen, 3, 32, fsdp=2, probe=False)
    with pytest.raises(ValueError, match="fsdp"):
        plan_scoring(tiny_qwen, 2, 32, base_format="int8", fsdp=2, probe=False)
    # the teacher's logits under kd; --targets plans only the layers it names
    kd = plan_scoring(tiny_qwen, 2, 32, probe=False, objective="lm+kd")
    vocab = plan.shapes["vocab"]
    assert steps(kd) - steps(plan) == 2 * 4 * 2 * 31 * vocab
    some = plan_scoring(tiny_qwen, 2, 32, probe=False, targets=["q_proj"])
    assert some.shapes["target_layers"] == len([n for n in targets if n.endswith("q_proj")])
    assert some.shapes["target_params"] < plan.shapes["target_params"]


def test_a_7b_plan_follows_the_readme_accounting():
    """Llama-2-7B's shapes from its config alone (meta device): 6.5 B target weights whose full-rank
    factors hold (8h² + 3(Ih + h²)) / (4h² + 3Ih) = 1.58 × as many values (the README's "≈ 1.55 ×")."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    plan = plan_scoring("llama-2-7b (config)", 1, 128, device="cuda", config=config, probe=False)
    assert plan.shapes["target_params"] == pytest.approx(6.48e9, rel=0.01)
    h, i = 4096, 11008
    per_block = 4 * 2 * h * h + 3 * (i * h + h * h) + 4 * h + 3 * h  # U, Vh of q/k/v/o and the MLP, plus s
    assert plan.shapes["factor_values"] == 32 * per_block
    assert plan.settings["precision_used"] == "bfloat16"
    assert plan.needed("gpu") > 40 * 2**30  # weights 27 GB (float32 W kept) + bf16 copies + factors


def test_a_plan_within_its_stated_error_of_a_measured_peak(tiny_llama_wide, tmp_path):
    """A short scoring run in its own process (the allocator returning freed blocks, as RESULTS measures):
    the plan's step phase is within TINY_PLAN_ERROR of the largest peak RSS within a step."""
    batch, seq = 4, 64
    plan = plan_scoring(tiny_llama_wide, batch, seq, precision="fp32", probe=False)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "acip_core", "score", "--model", tiny_llama_wide,
                          "--data", "corpus:train", "--out", str(out), "--steps", "2", "--post-tune-steps", "0",
                          "--batch-size", str(batch), "--seq-len", str(seq), "--precision", "fp32",
                          "--eval-windows", "0", "--stop-ratio", "0.05", "--json"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout)["result"]["steps_peak_mib"] * 2**20
    planned = plan.phase_bytes("ram")["steps"]
    assert abs(planned - measured) / measured <= TINY_PLAN_ERROR, (planned / 2**20, measured / 2**20)


def _tight(monkeypatch, ram_bytes):
    monkeypatch.setattr(plan_mod, "available_memory", lambda device="cpu": {"ram": ram_bytes})


def test_a_plan_larger_than_memory_is_refused_with_both_numbers(tiny_llama, tmp_path, monkeypatch):
    from acip_core.serving.jobs import ScoringJobs

    _tight(monkeypatch, 64 * 2**20)
    plan = plan_scoring(tiny_llama, 2, 32, probe=False)
    with pytest.raises(PlanRefused, match=r"needs \d+\.\d\d GiB of RAM .* but 0\.06 GiB is available"):
        check_fits(plan)
    jobs = ScoringJobs(tmp_path / "runs")
    with pytest.raises(PlanRefused, match="0.06 GiB is available"):
        jobs.start("big", model=tiny_llama, data="corpus:train", steps=2, batch_size=2, seq_len=32)
    assert not (tmp_path / "runs" / "big").exists()  # nothing created

    from acip_core.cli import main

    out = tmp_path / "cli-run"
    assert main(["score", "--model", tiny_llama, "--data", "corpus:train", "--out", str(out), "--steps", "2"]) == 2
    assert not out.exists()


def test_a_plan_that_fits_passes(tiny_llama, monkeypatch):
    _tight(monkeypatch, 2**50)
    plan = plan_scoring(tiny_llama, 2, 32, probe=False)
    check_fits(plan)
    assert plan.fits() is True
    _tight(monkeypatch, 0)
    assert plan_scoring(tiny_llama, 2, 32, probe=False).fits() is False


def test_a_hub_id_that_is_not_cached_fails_fast_offline(monkeypatch):
    from acip_core.sources.models import ModelSourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        load_config("acip-studio-tests/no-such-model")
    assert time.perf_counter() - start < 5
    with pytest.raises(ModelSourceError, match="unknown model"):
        load_config("not a model id")


def test_the_cli_prints_a_table_and_json(tiny_llama, capsys):
    from acip_core.cli import main

    assert main(["plan", "--model", tiny_llama, "--batch-size", "2", "--seq-len", "32", "--no-probe"]) == 0
    text = capsys.readouterr().out
    assert "activations saved for backward" in text and "scoring needs" in text
    assert main(["plan", "--model", tiny_llama, "--fsdp", "2", "--batch-size", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["settings"]["fsdp"] == 2 and got["needed"]["ram"] > 0
    assert {t["name"] for t in got["terms"]} >= {"frozen shards (1/2, float32)", "masks + LoRA + grads + AdamW"} \
        or got["settings"]["precision_used"] != "float32"
    assert got["step_seconds_estimate"] is not None  # the probe ran (an estimate)


def test_the_score_tab_shows_the_plan_of_the_typed_model(tiny_llama, monkeypatch):
    import app_handlers

    _tight(monkeypatch, 2**50)
    text = app_handlers.score_plan(tiny_llama, 2, 32)
    assert "scoring needs" in text and "**fits**" in text
    _tight(monkeypatch, 2**20)
    assert "does not fit" in app_handlers.score_plan(tiny_llama, 2, 32)
    assert "not available" in app_handlers.score_plan(tiny_llama, 0, 32)  # said in place, not raised
    # past the model's context, or past what a run may use: refused before a step is traced (its cost
    # grows with seq_len: 10**7 tokens ran for minutes)
    context = AutoConfig.from_pretrained(tiny_llama).max_position_embeddings
    assert f"exceeds the model's context of {context}" in app_handlers.score_plan(tiny_llama, 2, context + 1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        plan_scoring(tiny_llama, 2, context + 1, probe=False)
    monkeypatch.setenv("ACIP_PUBLIC", "1")
    monkeypatch.setattr(app_handlers.public, "check_model", lambda source: source)  # the tiny folder
    assert r"tokens per sequence must be a whole number in \[8, 512\]" in app_handlers.score_plan(tiny_llama, 2, 10**7)
    assert r"batch size must be a whole number in \[1, 4\]" in app_handlers.score_plan(tiny_llama, 10**6, 32)


def test_a_config_too_large_to_build_is_refused_before_building(tmp_path):
    """Anybody can publish a config: one with a million layers (or layers × experts beyond any real
    model) is refused at once instead of building a meta model for an hour."""
    import time

    from transformers import LlamaConfig, MixtralConfig

    from acip_core.training.plan import MAX_EXPERT_BLOCKS, MAX_LAYERS, check_buildable

    start = time.perf_counter()
    for config in (LlamaConfig(num_hidden_layers=1_000_000),
                   MixtralConfig(num_hidden_layers=MAX_LAYERS, num_local_experts=MAX_EXPERT_BLOCKS // MAX_LAYERS + 1)):
        with pytest.raises(ValueError, match="beyond what a plan builds"):
            plan_mod.meta_model(config)
    folder = tmp_path / "huge"
    LlamaConfig(num_hidden_layers=10 ** 6).save_pretrained(folder)
    with pytest.raises(ValueError, match="beyond what a plan builds"):
        plan_scoring(str(folder), probe=False)
    assert time.perf_counter() - start < 5
    check_buildable(LlamaConfig(num_hidden_layers=126))  # the largest real models pass
    check_buildable(MixtralConfig(num_hidden_layers=61, num_local_experts=256))

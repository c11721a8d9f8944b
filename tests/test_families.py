"""Every decoder family: targets discovered per model, and the whole path (score → size → generate →
export low-rank / dense / int8 → a fresh process with plain from_pretrained → the app's tokens) on a
tiny random model of each (tests/families.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from acip_core.sources.models import load_base
from acip_core.engine.parametrize import (TargetError, decoder_blocks, discover_targets, target_linears, target_names,
                                   transposed_names, weight_share)
from families import FAMILIES, MOE, MOE_TARGETS, tiny_family
from helpers import random_ids

# what discovery must find in each family's blocks (leaf names; fused projections are one layer)
EXPECTED = {
    **{f: {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
       for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "stablelm")},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "falcon": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "mixtral": set(MOE_TARGETS["mixtral"]),  # named with --targets (its experts are 3-D parameters)
}
PER_BLOCK = {f: len(v) for f, v in EXPECTED.items()} | {"gpt2": 4}  # GPT-2: attn.c_proj and mlp.c_proj
MATRIX = list(FAMILIES) + list(MOE)
TOKENS = 8


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_family(f, root / f, tiny_tokenizer) for f in MATRIX}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_discovery_takes_every_projection_of_the_blocks_and_nothing_else(tiny_families, family):
    model, _ = load_base(tiny_families[family])
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    linears = target_linears(model)
    root, blocks = decoder_blocks(model)
    assert set(target_names(linears)) == EXPECTED[family]
    assert len(linears) == PER_BLOCK[family] * len(blocks) == PER_BLOCK[family] * 2
    assert all(n.startswith(root + ".") and isinstance(m, nn.Linear) for n, m in linears.items())
    # every 2-D weight of the blocks is targeted (norms are 1-D); outside them, none (embeddings, head)
    block_2d = {f"{root}.{n}" for n, p in blocks.named_parameters() if p.dim() == 2}
    assert block_2d == {f"{n}.weight" for n in linears}
    head = model.get_output_embeddings()
    assert all(m is not head and m is not model.get_input_embeddings() for m in linears.values())
    assert 0.4 < weight_share(model, linears) < 0.8  # the rest: embeddings (and an untied head) of a tiny vocab
    if family == "gpt2":  # Conv1D [in, out] became nn.Linear [out, in], the same numbers
        assert transposed_names(model) == set(linears)
        for n, m in linears.items():
            assert torch.equal(m.weight, original[n].t())
    else:
        assert not transposed_names(model)


def test_gpt2_linearized_conv1d_gives_the_same_logits(tiny_families, tiny_tokenizer):
    model, _ = load_base(tiny_families["gpt2"])
    ids = random_ids(len(tiny_tokenizer))
    with torch.no_grad():
        before = model(ids).logits
        target_linears(model)
        assert torch.equal(model(ids).logits, before)


def test_targets_option_chooses_layers_by_leaf_or_suffix(tiny_families):
    model, _ = load_base(tiny_families["gpt2"])
    assert set(discover_targets(model, ["mlp.c_proj"])) == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
    assert len(discover_targets(model, ["c_proj"])) == 4
    with pytest.raises(TargetError, match=r"GPT2LMHeadModel: no linear layer matches --targets q_proj; "
                                          r"its linear layers are named c_attn, c_fc, c_proj"):
        discover_targets(model, ["q_proj"])


def test_a_model_without_targets_is_refused_with_its_class_and_what_it_has():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.LayerNorm(8) for _ in range(2)])

    with pytest.raises(TargetError, match=r"Toy: no linear layer found .*blocks.*LayerNorm"):
        target_linears(Toy())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_experts_stored_as_3d_parameters_are_refused_unless_targets_are_named(tiny_tokenizer, tmp_path, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=64,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = AutoModelForCausalLM.from_config(config)
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers stores the experts as nn.Linear (discovered as targets)")
    with pytest.raises(TargetError, match=rf"{type(model).__name__} stores .* 3-D parameters .*--targets"):
        target_linears(model)
    chosen = target_linears(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(chosen) == 8
    if model_type == "qwen2_moe":  # its router (`gate`) and shared-expert gate [1, hidden] are never targets
        names = set(discover_targets(model, ["gate", "shared_expert_gate", "shared_expert.gate_proj"]))
        assert any(n.endswith("shared_expert.gate_proj") for n in names)  # named: the user's choice


# -- the whole path, every family ----------------------------------------------------------------
_FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for job in json.load(open(sys.argv[1])):
    try:
        kw = dict(trust_remote_code=True) if job["kind"] != "dense" else {}
        if job["kind"] != "int8":
            kw["dtype"] = torch.float32
        model = AutoModelForCausalLM.from_pretrained(job["folder"], local_files_only=True, **kw).eval()
        ids = torch.tensor(job["ids"])
        with torch.no_grad():  # the export's generation_config.json: greedy, the app's repetition penalty
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["n"],
                                 min_new_tokens=job["n"], pad_token_id=job["pad"])
        out[job["key"]] = dict(tokens=got.tolist(), cls=type(model).__name__)
    except Exception as e:  # one family's failure is reported by its own test
        out[job["key"]] = dict(error=f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


def _app_tokens(any_size, size, fmt, ids, pad):
    """What the app's chat does at this size (explorer.Generation): greedy, repetition penalty 1.15."""
    from acip_core.export.folder import GENERATION

    with torch.no_grad():
        return any_size.materialize(size, fmt).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
            pad_token_id=pad, **GENERATION).tolist()


def _run_family(family, folder, out, tokenizer, text):
    from acip_core import ScoreConfig, run_scoring
    from acip_core.evaluation.evaluate import generate_text
    from acip_core.export.sized import export_dense, export_lowrank
    from acip_core.engine.materialize import count_bytes, count_params
    from acip_core.artifacts.open import open_artifact

    cfg = ScoreConfig(steps=3, batch_size=2, seq_len=32, lr=2e-3, post_tune_steps=0, checkpoint_every=100,
                      precision="fp32", lora_rank=4)
    artifact = run_scoring(folder, str(text), out / "artifact", "whitened", cfg, eval_windows=0,
                           curve_sizes=[0.5, 1.0], targets=MOE_TARGETS.get(family))
    assert set(artifact.meta.targets) == EXPECTED[family]
    any_size = open_artifact(out / "artifact")  # reopened by its recorded layers
    assert list(any_size.targets) == list(artifact.meta.layers)
    size = any_size.size_for_ratio(0.5)
    facts = dict(size_ratio=size.size_ratio, dense_layers=size.dense_layers, layers=len(size.ranks))
    model = any_size.materialize(size)
    # size accounting exact, fused projections included: what the materialized model holds
    facts["params_exact"] = count_params(model) == size.params
    facts["bytes_exact"] = count_bytes(model) == size.nbytes
    facts["text"] = generate_text(model, tokenizer, "The handbook says", max_new_tokens=6, chat=False)
    pad = tokenizer.pad_token_id
    ids = random_ids(len(tokenizer), (1, 10), seed=3)
    jobs = []
    for kind, fmt, export in (("lowrank", "float32", export_lowrank), ("dense", "float32", export_dense),
                              ("int8", "int8", export_lowrank)):
        folder_out = export(any_size, any_size.size_at(size.prefix, fmt), out / kind)
        jobs.append(dict(key=f"{family}/{kind}", kind=kind, folder=str(folder_out), ids=ids.tolist(), n=TOKENS,
                         pad=pad, want=_app_tokens(any_size, size, fmt, ids, pad)))
    if family == "gpt2":  # the dense export holds GPT-2's own Conv1D layout: at size 1.0, the original weights
        from safetensors.torch import load_file

        full = export_dense(any_size, any_size.full_size(), out / "dense-full")
        stored = load_file(str(full / "model.safetensors"))
        base, _ = load_base(folder)  # not linearized: Conv1D as the checkpoint has it
        facts["conv1d_layout"] = all(torch.equal(stored[f"{n}.weight"], base.get_submodule(n).weight)
                                     for n in any_size.targets)
    return facts, jobs


@pytest.fixture(scope="module")
def family_matrix(tiny_families, tiny_tokenizer, tmp_path_factory):
    """Every family's path, then one fresh process that loads every export (keeps CI time low)."""
    from acip_core.sources.data import load_text

    root = tmp_path_factory.mktemp("matrix")
    text = root / "calibration.txt"  # a short text: tokenizing the whole corpus would dominate tiny runs
    text.write_text(load_text("corpus:train")[:60_000], encoding="utf-8")
    # one thread: tiny products gain nothing from more, and on a shared, loaded machine two threads
    # wait on each other at every operation (the numbers do not depend on it: both sides use one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results, jobs = {}, []
    for family in MATRIX:
        try:
            facts, family_jobs = _run_family(family, tiny_families[family], root / family, tiny_tokenizer, text)
            results[family] = dict(facts=facts, jobs=family_jobs)
            jobs += family_jobs
        except Exception as e:
            results[family] = dict(error=f"{type(e).__name__}: {e}")
    torch.set_num_threads(threads)
    manifest = root / "jobs.json"
    manifest.write_text(json.dumps([{k: v for k, v in j.items() if k != "want"} for j in jobs]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(manifest)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results.values():
        for job in r.get("jobs", []):
            job["got"] = loaded[job["key"]]
    return results


@pytest.mark.parametrize("family", MATRIX)
def test_family_scores_sizes_exports_and_loads_fresh_with_the_apps_tokens(family_matrix, family):
    result = family_matrix.get(family)
    assert result is not None, f"{family} was not run"
    assert "error" not in result, result.get("error")
    facts = result["facts"]
    assert abs(facts["size_ratio"] - 0.5) <= 0.01
    assert facts["params_exact"] and facts["bytes_exact"]
    assert facts["layers"] == PER_BLOCK[family] * 2 and facts["dense_layers"] < facts["layers"]
    assert isinstance(facts["text"], str)
    if family == "gpt2":
        assert facts["conv1d_layout"], "the dense export must write Conv1D weights as [in, out]"
    for job in result["jobs"]:
        got = job["got"]
        assert "error" not in got, f"{job['key']}: {got.get('error')}"
        if job["kind"] == "dense":
            assert not got["cls"].startswith("ACIP")  # the base architecture, no remote code
        else:
            assert got["cls"].startswith("ACIPForCausalLM__")
        assert got["tokens"] == job["want"], f"{job['key']}: the export's tokens differ from the app's"


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "acip_core", *args, "--json"], capture_output=True, text=True,
                          timeout=300, env=env)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_score_takes_targets_and_writes_what_it_chose(tiny_families, tmp_path):
    from acip_core.artifacts.artifact import load_artifact
    from acip_core.sources.data import load_text

    text = tmp_path / "calibration.txt"
    text.write_text(load_text("corpus:train")[:30_000], encoding="utf-8")
    common = ("--model", tiny_families["gpt2"], "--data", str(text), "--steps", "2", "--batch-size", "2",
              "--seq-len", "32", "--post-tune-steps", "0", "--eval-windows", "0", "--precision", "fp32")
    rc, out = _cli("score", *common, "--out", str(tmp_path / "named"), "--targets", "c_attn, mlp.c_proj")
    assert rc == 0, out
    assert out["targets"] == ["c_attn", "c_proj"] and out["target_layers"] == 4
    meta = load_artifact(tmp_path / "named").meta
    assert meta.targets_chosen_by == "--targets"
    assert set(meta.layers) == {f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "mlp.c_proj")}
    rc, out = _cli("score", *common, "--out", str(tmp_path / "bad"), "--targets", "q_proj")
    assert rc == 2 and "GPT2LMHeadModel: no linear layer matches --targets q_proj" in out["error"]
    assert not (tmp_path / "bad" / "acip.json").exists()


def test_a_scoring_job_passes_targets_on_and_refuses_malformed_ones_before_writing(tmp_path, monkeypatch):
    from acip_core.serving.jobs import ScoringJobs

    jobs = ScoringJobs(tmp_path / "runs")
    with pytest.raises(ValueError, match="comma-separated layer names"):
        jobs.start("r", model="m", targets="c_attn;touch /tmp/x")
    assert not (tmp_path / "runs" / "r").exists()
    launched = []
    monkeypatch.setattr(jobs, "_launch", lambda name, args: launched.append(args) or {})
    monkeypatch.setattr(jobs, "_check_memory", lambda *a: None)  # "m" is no model to plan
    jobs.start("r", model="m", targets=" c_attn , mlp.c_proj ")
    i = launched[0].index("--targets")
    assert launched[0][i + 1] == "c_attn,mlp.c_proj"
    jobs.start("r2", model="m", targets="")
    assert "--targets" not in launched[1]  # empty: discovered


def test_the_apps_layer_table_tells_gpt2s_two_c_proj_apart(tiny_families):
    from acip_core.serving.explorer import Explorer
    from helpers import random_any_size

    any_size = random_any_size(tiny_families["gpt2"])[0]
    explorer = Explorer(any_size)
    table = explorer.layer_table(0.5)
    assert list(table.module) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "all"]
    assert list(table.layers) == [2, 2, 2, 2, 8]
    heat = explorer.rank_heatmap(0.5)
    assert heat["types"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] and heat["blocks"] == [0, 1]


@pytest.mark.embedded
def test_discovery_on_smollm2_picks_the_shipped_artifacts_layers():
    """The shipped artifact was scored with the seven Llama names: discovery picks the same 210 layers,
    and the artifact reopens by its recorded layers."""
    from pathlib import Path

    from acip_core.artifacts.artifact import load_artifact
    from acip_core.sources.models import EMBEDDED
    from acip_core.artifacts.open import artifact_linears

    model, _ = load_base(EMBEDDED)
    artifact = load_artifact(Path(__file__).parent.parent / "precomputed" / "smollm2-135m-instruct")
    assert list(target_linears(model)) == list(artifact.meta.layers) == list(artifact_linears(artifact, model))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_memory_plan_counts_every_family_from_its_config(tiny_families, family):
    """plan.py builds the model on the meta device and runs one step there: no family may need values
    (GPT-2's padding check read the ids), and the plan counts the layers discovery takes."""
    from acip_core.training.plan import plan_scoring

    model, _ = load_base(tiny_families[family])
    plan = plan_scoring(tiny_families[family], batch_size=2, seq_len=32, probe=False)
    assert plan.shapes["target_layers"] == len(target_linears(model))
    assert plan.phase_bytes("ram")["steps"] > 0

"""The distributed scoring path on CPU: 2 processes over gloo, under torchrun and accelerate launch."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from acip_core import load_artifact

ARGS = ["score", "--data", "corpus:train", "--basis", "svd", "--steps", "12", "--post-tune-steps", "2",
        "--batch-size", "4", "--seq-len", "32", "--lr", "2e-3", "--reg-init", "1e-2", "--reg-growth", "1.05",
        "--lora-dropout", "0.0", "--precision", "fp32", "--eval-windows", "0", "--json"]


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _compare(a, b):
    a, b = load_artifact(a), load_artifact(b)
    assert a.meta.result.steps == b.meta.result.steps
    for n in a.scores:  # same pruning order: scores equal (fp reduction order may differ slightly)
        torch.testing.assert_close(a.scores[n], b.scores[n], atol=1e-4, rtol=0)
    for n in a.adapters:
        torch.testing.assert_close(a.adapters[n], b.adapters[n], atol=1e-4, rtol=1e-3)
    # the figures of benchmarks/RESULTS.md (pytest -s tests/test_distributed.py)
    print(f"\nmax |Δ| vs single process: scores {max((a.scores[n] - b.scores[n]).abs().max().item() for n in a.scores):.2e}, "
          f"LoRA {max((a.adapters[n] - b.adapters[n]).abs().max().item() for n in a.adapters):.2e}, "
          f"masks' pruning order equal: {all(torch.equal(a.scores[n].argsort(stable=True), b.scores[n].argsort(stable=True)) for n in a.scores)}")


@pytest.fixture(scope="module")
def single(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _run([sys.executable, "-m", "acip_core", *ARGS, "--model", tiny_llama, "--out", str(out)], out)
    return out


def test_torchrun_two_processes_equal_single_process(single, tiny_llama, tmp_path):
    out = tmp_path / "ddp"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "acip_core", *ARGS, "--model", tiny_llama, "--out", str(out)], tmp_path)
    assert load_artifact(out).meta.scoring["processes"] == 2
    assert not (out / ".lock").exists() and len((out / "log.jsonl").read_text().splitlines()) == 14
    _compare(single, out)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_fsdp_shards_the_frozen_tensors_and_equals_single_process(single, tiny_llama, tiny_llama_tied, tmp_path,
                                                                    tied):
    model = tiny_llama_tied if tied else tiny_llama
    if tied:
        single = tmp_path / "single"
        _run([sys.executable, "-m", "acip_core", *ARGS, "--model", model, "--out", str(single)], tmp_path)
    out = tmp_path / "fsdp"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "acip_core", "-v", *ARGS, "--fsdp", "--model", model, "--out", str(out)], tmp_path)
    # only rank 0 reads the weights; rank 1 builds on the meta device and receives its shards
    before = dict(re.findall(r"FSDP: rank (\d) has (\d+) of \d+ frozen values in memory before", proc.stderr))
    held = [tuple(map(int, m)) for m in re.findall(r"FSDP: rank \d holds (\d+) of (\d+) frozen values", proc.stderr)]
    assert len(held) == 2 and len(before) == 2, proc.stderr[-2000:]
    print(f"\nFSDP ({'tied' if tied else 'untied'}): frozen values before sharding: rank 0 {int(before['0']):,}, "
          f"rank 1 {int(before['1']):,}; held after: " + ", ".join(f"{h:,} of {t:,}" for h, t in held))
    assert int(before["0"]) == held[0][1] and int(before["1"]) == 0
    assert sum(h for h, _ in held) == held[0][1]  # the two ranks split the frozen tensors between them
    assert all(h <= 0.6 * total for h, total in held), held  # each holds about half, not the whole model
    meta = load_artifact(out).meta
    assert meta.scoring["processes"] == 2 and meta.scoring["fsdp"] is True
    _compare(single, out)


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate CLI not installed")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_accelerate_launch_two_processes(single, tiny_llama, tmp_path, fsdp):
    out = tmp_path / "acc"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    mode = ["--use_fsdp"] if fsdp else ["--multi_gpu"]  # --use_fsdp: our --fsdp, through accelerate's env
    _run([accelerate, "launch", *mode, "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "acip_core", *ARGS,
          "--model", tiny_llama, "--out", str(out)], tmp_path)
    assert load_artifact(out).meta.scoring["fsdp"] is fsdp
    _compare(single, out)

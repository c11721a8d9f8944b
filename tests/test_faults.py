"""Runs that survive faults: kill -9 at a random step, resume, same artifact as an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from acip_core import load_artifact

ARGS = ["score", "--data", "corpus:train", "--basis", "svd", "--steps", "30", "--post-tune-steps", "4",
        "--batch-size", "2", "--seq-len", "32", "--lr", "2e-3", "--reg-init", "1e-2", "--reg-growth", "1.05",
        "--checkpoint-every", "3", "--precision", "fp32", "--eval-windows", "0"]


def _cmd(model, out, *extra):
    return [sys.executable, "-m", "acip_core", *ARGS, "--model", model, "--out", str(out), *extra]


def _steps(log):
    return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else []


def test_kill_9_then_resume_equals_uninterrupted(tiny_llama, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_cmd(tiny_llama, tmp_path / "full"), check=True, env=env, capture_output=True, timeout=600)
    total = len(_steps(tmp_path / "full" / "log.jsonl"))  # the stop ratio may end the run before --steps
    out = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(2, total - 2)
    proc = subprocess.Popen(_cmd(tiny_llama, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_steps(out / "log.jsonl")) < kill_at:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "acip.json").exists()
    resumed = subprocess.run(_cmd(tiny_llama, out, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_artifact(tmp_path / "full"), load_artifact(out)
    for n in a.scores:
        assert torch.equal(a.scores[n], b.scores[n])
    for n in a.adapters:
        torch.testing.assert_close(a.adapters[n], b.adapters[n], atol=1e-6, rtol=1e-6)
    assert _steps(out / "log.jsonl") == list(range(1, a.meta.result.steps + 1))


def test_truncated_checkpoint_is_named_on_resume(tiny_llama, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cmd(tiny_llama, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (out / "checkpoint.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    blob = out / json.loads((out / "checkpoint.json").read_text())["tensors"]
    blob.write_bytes(blob.read_bytes()[:100])
    resumed = subprocess.run(_cmd(tiny_llama, out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 2 and f"{blob.name} is corrupted or truncated" in resumed.stderr

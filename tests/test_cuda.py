"""The GPU paths: the low-bit products on CUDA and scoring on a GPU (skipped on machines without one;
benchmarks/gpu_check.sh runs them on a lent GPU and records the result in benchmarks/RESULTS.md)."""

import json

import pytest
import torch

from acip_core import ScoreConfig, run_scoring
from acip_core.formats.int4 import _cuda_int4_kernel
from acip_core.formats.registry import parse_format

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_low_bit_products_on_cuda_match_the_dequantized_oracle(fmt):
    f = parse_format(fmt)
    torch.manual_seed(0)
    w = torch.randn(200, 384, device="cuda")  # 200 rows: int4 pads them to blocks of 32
    q = f.pack(w)
    x = torch.randn(7, 384, device="cuda", dtype=torch.bfloat16)
    for part, cut in ((q, None), (q.rows(160), 160), (q.cols(256), 256)):
        ref = x[:, : part.shape[1]].float() @ part.dequantize().t()
        y = part.matmul(x[:, : part.shape[1]].contiguous())
        assert y.shape == ref.shape and y.dtype == torch.bfloat16
        assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    if f.name == "int4":  # the fast kernel, not the reference, on any Ampere-or-later GPU
        assert torch.cuda.get_device_capability() < (8, 0) or _cuda_int4_kernel(x.device)
        assert q.data.dtype == torch.int32
    assert q.nbytes == f.weight_bytes(200, 384)  # the bytes a budget counts are the bytes held


def test_gradients_pass_quantized_factors_on_cuda():
    q = parse_format("int4").pack(torch.randn(64, 128, device="cuda"))
    x = torch.randn(3, 128, device="cuda", requires_grad=True)
    q.matmul(x.to(torch.bfloat16)).float().sum().backward()
    ref = q.dequantize().sum(0)
    assert torch.allclose(x.grad[0], ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("base", ["float32", "int8", "int4"])
def test_scoring_runs_on_the_gpu(tiny_llama_wide, tmp_path, base):
    cfg = ScoreConfig(steps=12, batch_size=2, seq_len=32, lr=2e-3, reg_init=1e-2, reg_growth=1.05,
                      stop_ratio=0.4, post_tune_steps=2, checkpoint_every=5, base_format=base)
    art = run_scoring(tiny_llama_wide, "corpus:train", tmp_path / base, "svd", cfg, eval_windows=2,
                      curve_sizes=[0.5, 1.0])
    assert art.meta.scoring["device"].startswith("cuda")
    assert art.meta.result.extra["gpu_peak_mib"] > 0
    log = [json.loads(line) for line in (tmp_path / base / "log.jsonl").read_text().splitlines()]
    assert all(row["gpu_peak_mib"] > 0 for row in log)
    acip = art.curve[art.curve.method == "acip"]
    assert acip.ppl_heldout.notna().all()


def test_a_gpu_scoring_run_resumes(tiny_llama, tmp_path):
    """A checkpoint's score map is restored beside the masks on the GPU (it once came back on the CPU
    and the first step after a resume failed on the device mismatch)."""
    cfg = ScoreConfig(steps=12, batch_size=2, seq_len=32, lr=2e-3, reg_init=1e-2, reg_growth=1.05,
                      stop_ratio=0.4, post_tune_steps=3, checkpoint_every=7, precision="fp32")
    calls = {"n": 0}

    def stop_after_8():
        calls["n"] += 1
        return calls["n"] >= 8

    part = tmp_path / "part"
    assert run_scoring(tiny_llama, "corpus:train", part, "svd", cfg, should_stop=stop_after_8,
                       eval_windows=0, curve_sizes=[0.5]) is None
    resumed = run_scoring(tiny_llama, "corpus:train", part, "svd", cfg, resume=True, eval_windows=0,
                          curve_sizes=[0.5])
    full = run_scoring(tiny_llama, "corpus:train", tmp_path / "full", "svd", cfg, eval_windows=0,
                       curve_sizes=[0.5])
    for n in full.scores:  # GPU kernels need not be bitwise reproducible: close, not equal
        torch.testing.assert_close(resumed.scores[n], full.scores[n], atol=1e-3, rtol=0)

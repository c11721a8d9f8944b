"""Concurrent users of the launched app (a small version of benchmarks/load_test.py, on a tiny artifact):
no request errors, every greedy reply equal to the lone user's at that size, bounded memory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import load_test  # noqa: E402


@pytest.fixture(scope="module")
def small_lora_artifact(tmp_path_factory, tiny_llama):
    """Like tiny_artifact with a rank-2 LoRA: the conftest one's rank-32 LoRA makes every layer of the
    tiny model run dense, so all its sizes answer alike and cross-talk could not show."""
    from acip_core import ScoreConfig, run_scoring

    out = tmp_path_factory.mktemp("load-art") / "tiny-lora2"
    cfg = ScoreConfig(steps=400, batch_size=2, seq_len=32, lr=2e-3, reg_init=1e-2, reg_growth=1.05,
                      stop_ratio=0.4, post_tune_steps=5, checkpoint_every=10, precision="fp32", lora_rank=2)
    run_scoring(tiny_llama, "corpus:train", out, "whitened", cfg, eval_windows=2, curve_sizes=[0.4, 0.7, 1.0])
    return out


def test_concurrent_users_get_the_lone_users_answers(small_lora_artifact, tmp_path):
    report = load_test.run(small_lora_artifact, clients=4, seconds=12, ratios=(1.0, 0.6, 0.3), bf16_ratio=0.3,
                           prompts=load_test.PROMPTS[:2], max_new_tokens=16, ppl_windows=2, ppl_seq_len=128,
                           think_s=0.1, runs_dir=tmp_path / "runs", log=lambda *_: None)
    text = load_test.summary(report)
    print(text)
    assert report["errors"] == 0 and report["server_tracebacks"] == 0, text
    assert report["mismatches"] == 0, text
    # the sizes answer differently (else cross-talk could not show), every kind of request ran
    assert max(report["distinct_replies"].values()) >= 3, report["distinct_replies"]
    assert all(v["requests"] > 0 for v in report["per_kind"].values()), text
    assert report["requests"] >= 20, text
    # more (size, dtype) keys than the Explorer caches, and memory stays bounded: the load adds at
    # most working memory (sessions, generations in flight) to what the lone user's pass left
    cache = report["cached_sizes"]
    assert cache["distinct_keys_used"] > cache["explorer_cache_limit"], text
    rss = report["rss"]
    assert rss["peak_load_mb"] < rss["after_lone_user_mb"] + 300, text
    assert rss["second_half_peak_mb"] < rss["first_half_peak_mb"] + 100, text

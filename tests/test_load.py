"""Concurrent users of the launched app (a small version of benchmarks/load_test.py, on a tiny artifact):
no request errors, every greedy reply equal to the lone user's at that size, bounded memory."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import load_test  # noqa: E402


def test_concurrent_users_get_the_lone_users_answers(tiny_artifact, tmp_path):
    report = load_test.run(tiny_artifact, clients=4, seconds=12, ratios=(1.0, 0.6, 0.3), bf16_ratio=0.3,
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

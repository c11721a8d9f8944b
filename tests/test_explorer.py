"""The app's engine on a real (tiny) artifact: sizes, tables, chat streaming, measurements, jobs."""

import json
import math
import threading
import time

import pandas as pd
import pytest

from acip_core.evaluation.evaluate import Cancelled
from acip_core.serving.chat import clean_prompt
from acip_core.serving.checks import check_ratio
from acip_core.serving.explorer import Explorer
from acip_core.serving.jobs import ScoringJobs, read_log


@pytest.fixture(scope="module")
def explorer(tiny_artifact):
    return Explorer.open(tiny_artifact, cache_size=2)


def test_size_for_summary(explorer):
    s = explorer.size_for(0.6)
    assert 0.6 <= s["size_ratio"] <= 0.62
    assert s["gb_by_format"]["float32"] == pytest.approx(2 * s["gb_by_format"]["bfloat16"]) == pytest.approx(s["params"] * 4 / 1e9)
    assert s["dense_layers"] + s["low_rank_layers"] == s["layers"] == 14
    full = explorer.size_for(1.0)
    assert full["size_ratio"] == 1.0 and full["dense_layers"] == 14 and full["params"] == full["original_params"]
    # LoRA r=32 on 32-wide layers: every tiny layer runs dense, so params do not shrink here
    assert explorer.size_for(0.3)["params"] <= s["params"] <= full["params"]
    assert explorer.size_for(0.3)["kept_rank_fraction"] < s["kept_rank_fraction"] < 1.0


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.01, "abc", None, float("inf")])
def test_bad_ratios_are_clear_errors(explorer, bad):
    with pytest.raises(ValueError, match=r"size_ratio must be"):
        explorer.size_for(bad)


def test_budget(explorer):
    mid = explorer.size_for(0.6)
    fit = explorer.size_for_budget(mid["gb_by_format"]["bfloat16"], "bfloat16")
    assert fit["params"] >= mid["params"] and fit["budget_left_gb"] >= 0
    assert fit["gb_by_format"]["bfloat16"] <= mid["gb_by_format"]["bfloat16"]
    with pytest.raises(ValueError, match="smaller than the smallest model"):
        explorer.size_for_budget(explorer.smallest_gb("float32") * 0.5, "float32")
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(ValueError, match="budget must be"):
            explorer.size_for_budget(bad)
    with pytest.raises(ValueError, match="format"):
        explorer.size_for_budget(1.0, "int3")


def test_layer_table_and_heatmap(explorer):
    table = explorer.layer_table(0.5)
    assert list(table.module) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj", "all"]
    assert (table.dense + table.low_rank == table.layers).all() and table.layers.iloc[-1] == 14
    assert ((0 <= table.kept_percent) & (table.kept_percent <= 100)).all()
    full = explorer.layer_table(1.0)
    assert (full.kept_percent == 100).all() and (full.dense == full.layers).all()
    heat = explorer.rank_heatmap(0.5)
    assert heat["fraction"].shape == (2, 7) and heat["blocks"] == [0, 1]
    assert ((heat["fraction"] >= 0) & (heat["fraction"] <= 1)).all()
    size = explorer.size(0.5)
    assert heat["kept"].sum() == sum(size.ranks.values())


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4-g32"])
def test_layer_table_heatmap_and_summary_count_the_same_dense_layers(explorer, dtype):
    """One page, one count: the per-module table and the heatmap's D marks say which layers run dense
    as the selected format decides it, the same count as the summary (in int4 factors are padded to
    whole groups, so more layers run dense than in float32)."""
    for ratio in (0.5, 0.7, 0.9):
        want = explorer.size_for(ratio, dtype)["dense_layers"]
        assert explorer.layer_table(ratio, dtype).dense.iloc[-1] == want
        assert explorer.rank_heatmap(ratio, dtype)["dense"].sum() == want


def test_model_cache_is_lru_and_shared(explorer):
    a = explorer.model(0.5)
    assert explorer.model(0.5) is a  # same size, same object
    assert explorer.model(0.50000001) is a  # same prefix
    explorer.model(0.7)
    explorer.model(0.9)  # capacity 2: 0.5 is evicted
    assert explorer.model(0.5) is not a
    assert len(explorer.cached_sizes()) == 2


def test_prompt_validation():
    assert clean_prompt("  hi\x00 there\x07\n ") == "hi there"
    with pytest.raises(ValueError, match="empty"):
        clean_prompt(" \x01\x02 ")
    with pytest.raises(ValueError, match="limit is 8,000"):
        clean_prompt("a" * 8001)
    with pytest.raises(ValueError, match="must be text"):
        clean_prompt(None)
    assert check_ratio("0.25") == 0.25


def test_stream_chat_streams_and_counts(explorer):
    snaps = list(explorer.stream_chat(0.7, [], "Debian packages", max_new_tokens=12, repetition_penalty=1.1))
    assert snaps and snaps[-1]["done"] and snaps[-1]["tokens"] == 12  # the tiny model never emits EOS here
    assert snaps[-1]["first_token_s"] > 0 and snaps[-1]["tokens_per_s"] > 0
    texts = [s["text"] for s in snaps]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # text only grows
    # greedy: the same request gives the same text
    again = list(explorer.stream_chat(0.7, [], "Debian packages", max_new_tokens=12, repetition_penalty=1.1))
    assert again[-1]["text"] == texts[-1]
    with pytest.raises(ValueError, match="empty"):
        next(explorer.stream_chat(0.7, [], "   "))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(explorer.stream_chat(0.7, [], "hi", max_new_tokens=0))
    with pytest.raises(ValueError, match="repetition_penalty"):
        next(explorer.stream_chat(0.7, [], "hi", repetition_penalty=float("nan")))


def test_chat_history_is_truncated_to_the_context(explorer):
    history = [{"role": "user", "content": "the kernel " * 200},
               {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    snaps = list(explorer.stream_chat(0.7, history, "and then? " * 300, max_new_tokens=8))
    assert snaps[-1]["truncated"] and snaps[-1]["prompt_tokens"] <= 256 - 8


def test_closing_the_stream_stops_the_generation(explorer):
    gen = explorer.start_chat(1.0, [], "hello", max_new_tokens=200)
    while not gen.poll(0.05) and not gen.done:
        pass
    gen.stop()
    while not gen.done:
        gen.poll(0.05)
    assert gen.tokens < 200


def test_compare_streams_both(explorer):
    last = None
    for a, b in explorer.compare(0.5, 1.0, "the system", max_new_tokens=6):
        last = a, b
    a, b = last
    assert a["done"] and b["done"] and a["tokens"] == b["tokens"] == 6
    assert a["size_ratio"] < b["size_ratio"] == 1.0


def test_perplexity_rows_carry_their_spread_and_cancel(explorer):
    seen = []
    row = explorer.measure_perplexity(0.7, "corpus:heldout", windows=3, seq_len=32, batch_size=1,
                                      on_progress=lambda d, n: seen.append((d, n)))
    assert row["perplexity"] > 1 and row["windows"] == 3 and row["tokens"] == 96
    assert row["ppl_low"] < row["perplexity"] < row["ppl_high"] and row["nll_std"] > 0
    assert row["curve_perplexity"] is None  # the curve's windows are 256 tokens: not comparable
    assert seen[-1] == (3, 3)
    at_curve = explorer.measure_perplexity(0.7, "corpus:heldout", windows=1, seq_len=256)
    assert at_curve["curve_perplexity"] is not None  # the tiny curve has ppl_heldout at 0.4..1.0
    full = explorer.measure_perplexity(1.0, "corpus:heldout", windows=3, seq_len=32)
    assert math.isfinite(full["perplexity"])
    with pytest.raises(Cancelled):
        explorer.measure_perplexity(0.7, "corpus:heldout", windows=3, seq_len=32, should_stop=lambda: True)
    assert not hasattr(explorer, "results")  # rows belong to the caller (the app: one session)
    with pytest.raises(ValueError, match="windows"):
        explorer.measure_perplexity(0.7, windows=0)
    with pytest.raises(ValueError, match="context"):
        explorer.measure_perplexity(0.7, seq_len=4096)
    with pytest.raises(ValueError, match="no text at"):
        explorer.measure_perplexity(0.7, data="/nonexistent/file.txt", seq_len=32)


def test_lm_eval_checks_its_format_before_building_anything(explorer):
    families = set(explorer.any_size._families)
    for bad in ("int8+emb8+fast", "float8+fast", "bogus"):
        with pytest.raises(ValueError, match="format"):
            explorer.measure_lm_eval(0.7, "acip_last_word", limit=2, format=bad)
    assert set(explorer.any_size._families) == families


def test_perplexity_checks_every_input_before_work_and_keeps_few_windows(explorer, monkeypatch):
    """A refused request does no work (the app gives its quota back for it), and the token windows a
    visitor's choices of text and length create are bounded (measure.WINDOW_CACHE)."""
    from acip_core.serving import measure

    tokenized = []
    real = measure.token_windows
    monkeypatch.setattr(measure, "token_windows", lambda *a: tokenized.append(a[2]) or real(*a))
    explorer._windows.clear()
    for seq_len in range(8, 40):
        with pytest.raises(ValueError, match="format"):
            explorer.measure_perplexity(0.7, "corpus:heldout", windows=1, seq_len=seq_len, format="bogus")
    assert tokenized == [] and not explorer._windows
    for seq_len in range(8, 8 + 2 * measure.WINDOW_CACHE):
        explorer.measure_perplexity(0.7, "corpus:heldout", windows=1, seq_len=seq_len)
    assert len(explorer._windows) == measure.WINDOW_CACHE
    assert sorted(k[1] for k in explorer._windows) == list(range(8 + measure.WINDOW_CACHE, 8 + 2 * measure.WINDOW_CACHE))
    explorer.measure_perplexity(0.7, "corpus:heldout", windows=1, seq_len=8 + 2 * measure.WINDOW_CACHE - 1)
    assert len(tokenized) == 2 * measure.WINDOW_CACHE  # the most recent one came from the cache


def test_results_csv(explorer, tmp_path):
    row = explorer.measure_perplexity(0.9, windows=2, seq_len=32)
    path = explorer.results_csv([row], tmp_path / "out" / "results.csv")
    frame = pd.read_csv(path)
    assert len(frame) == 1 and "perplexity" in frame and frame.windows.dtype.kind == "i"
    assert frame.time.iloc[0][:4].isdigit() and frame.time.iloc[0][4] == "-"  # with its date


def test_budget_in_every_dtype_names_the_best(explorer):
    gb = explorer.size_for(0.7)["gb_by_format"]["float32"]
    fits = {f["format"]: f for f in explorer.fit_budget_every_format(gb)}
    assert fits["bfloat16"]["size_ratio"] >= fits["float32"]["size_ratio"]
    (best,) = [f for f in fits.values() if f.get("best")]
    ranked = [f["perplexity"] for f in fits.values() if f.get("perplexity") is not None]
    assert ranked and best["perplexity"] == min(ranked)
    # the tiny artifact's curve was measured in float32 only: other formats are not ranked by a guess
    assert fits["float32"]["perplexity"] is not None and fits["int8"]["perplexity"] is None
    from acip_core.evaluation.curve import best_for_budget  # one ranking: the CLI's `size --budget-gb` picks the same
    pick = best_for_budget(explorer.any_size, explorer.curve, gb, ppl_columns_first(explorer))
    assert pick["format"] == best["format"]  # curve rows keep 5 decimals of the ratio, the app all of them
    assert pick["size_ratio"] == pytest.approx(best["size_ratio"], abs=1e-5)
    tiny = explorer.smallest_gb("bfloat16") * 1.01
    fits = {f["format"]: f for f in explorer.fit_budget_every_format(tiny)}
    # (int4 sizes move in whole groups of 32: on 32-wide layers they are not the smallest models)
    assert fits["float32"]["fits"] is False and fits["bfloat16"]["fits"]
    assert sum(bool(f.get("best")) for f in fits.values()) == 1


def test_sweep_streams_every_size_in_turn(explorer):
    frames = list(explorer.sweep([1.0, 0.7, 0.4], "apt", max_new_tokens=4))
    last = frames[-1]
    assert [s["size_ratio"] for s in last] == [1.0, explorer.size(0.7).size_ratio, explorer.size(0.4).size_ratio]
    assert all(s["done"] and s["tokens"] == 4 for s in last)
    assert [len(f) for f in frames] == sorted(len(f) for f in frames)  # one size after another


def test_describe(explorer):
    info = explorer.describe()
    assert info["name"] == "tiny" and info["target_layers"] == 14 and info["smallest_measured"] == pytest.approx(0.4, abs=0.01)


def test_concurrent_sizes_do_not_interfere(explorer):
    """Two threads at different sizes give the same text as each size alone."""
    alone = {r: list(explorer.stream_chat(r, [], "apt", max_new_tokens=8))[-1]["text"] for r in (0.4, 1.0)}
    together = {}

    def run(r):
        together[r] = list(explorer.stream_chat(r, [], "apt", max_new_tokens=8))[-1]["text"]

    threads = [threading.Thread(target=run, args=(r,)) for r in (0.4, 1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_export_writes_a_zip(explorer, tmp_path):
    info = explorer.export(0.6, tmp_path / "lowrank", dense=False, zip_path=tmp_path / "lowrank.zip")
    assert (tmp_path / "lowrank.zip").is_file() and info["bytes"] > 0


# -- scoring jobs -------------------------------------------------------------------------------
def test_jobs_validation(tmp_path):
    jobs = ScoringJobs(tmp_path / "runs")
    for bad in ("", "../x", "a b", "x" * 70):
        with pytest.raises(ValueError, match="run name"):
            jobs.start(bad, model="m")
    with pytest.raises(ValueError, match="stop_ratio"):
        jobs.start("ok", model="m", stop_ratio=1.5)
    with pytest.raises(ValueError, match="not running"):
        (tmp_path / "runs" / "idle").mkdir(parents=True)
        jobs.cancel("idle")
    assert jobs.list() == []


def test_jobs_status_from_the_folder(tmp_path):
    """A run folder left by an earlier app process is found again: progress and ETA from log.jsonl."""
    folder = tmp_path / "runs" / "old"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(dict(name="old", args=[], model="m", created=1.0, pid=999999,
                                                     config=dict(steps=100, post_tune_steps=10, stop_ratio=0.4))))
    lines = [dict(step=i, phase="acip", loss=3.0 - i / 10, nll=2.0, reg_weight=1e-3 * 1.01 ** i,
                  size_ratio=1.0 - i / 100, seconds=2.0 * i) for i in range(1, 11)]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(row) for row in lines) + "\n{\"step\": 11, \"ph")
    jobs = ScoringJobs(tmp_path / "runs")
    (status,) = jobs.list()
    assert status["name"] == "old" and status["state"] == "stopped" and status["step"] == 10
    assert status["size_ratio"] == pytest.approx(0.9) and status["eta_s"] is None  # not running: no ETA
    assert ScoringJobs._eta(read_log(folder), dict(steps=100, post_tune_steps=10)) == pytest.approx(2.0 * 100)
    assert jobs.artifacts() == []


def test_scoring_job_runs_cancels_resumes_and_finishes(tmp_path, tiny_llama):
    jobs = ScoringJobs(tmp_path / "runs")
    common = dict(model=tiny_llama, data="corpus:train", steps=400, stop_ratio=0.4, batch_size=2, seq_len=32,
                  lr=2e-3, reg_init=1e-2, reg_growth=1.05, post_tune_steps=5, checkpoint_every=2,
                  precision="fp32")
    status = jobs.start("tiny", **common)
    assert status["state"] in ("starting", "running")
    with pytest.raises(ValueError, match="already running"):
        jobs.start("second", **common)
    deadline = time.time() + 120
    while time.time() < deadline and (jobs.status("tiny")["step"] or 0) < 4:
        time.sleep(0.2)
    assert jobs.status("tiny")["eta_s"] is not None
    status = jobs.cancel("tiny")
    assert status["state"] == "cancelled" and status["step"] >= 4
    jobs.resume("tiny")
    deadline = time.time() + 240
    while time.time() < deadline and jobs.status("tiny")["state"] != "finished":
        time.sleep(0.5)
    status = jobs.status("tiny")
    assert status["state"] == "finished", jobs.output_tail("tiny")
    assert jobs.artifacts() == [tmp_path / "runs" / "tiny"]
    assert Explorer.open(tmp_path / "runs" / "tiny").size_for(0.5)["size_ratio"] >= 0.5


def test_lm_eval_row(explorer):
    from acip_core.evaluation.lmeval import OFFLINE_TASKS

    row = explorer.measure_lm_eval(0.7, [OFFLINE_TASKS[0]], limit=4, batch_size=4)
    assert row["kind"] == "lm-eval" and 0 <= row[f"{OFFLINE_TASKS[0]}/acc"] <= 1
    assert row[f"{OFFLINE_TASKS[0]}/samples"] == 4
    with pytest.raises(ValueError, match="at least one"):
        explorer.measure_lm_eval(0.7, [])
    with pytest.raises(Cancelled):
        explorer.measure_lm_eval(0.7, [OFFLINE_TASKS[0]], limit=4, should_stop=lambda: True)


def ppl_columns_first(explorer) -> str:
    from acip_core.evaluation.curve import ppl_columns

    return ppl_columns(explorer.curve)[0][len("ppl_"):]


def test_a_budget_below_every_measured_size_never_calls_its_answer_measured(explorer):
    from acip_core.serving import texts

    tiny = explorer.smallest_gb("bfloat16") * 1.01
    answer = explorer.budget_answer(tiny)
    assert answer["best"] is not None and not answer["measured"]
    words = texts.budget_text(tiny, answer)
    assert "No size that fits was measured" in words and "lowest perplexity" not in words
    small = answer["smallest_measured"]
    assert small["format"] == "float32" and small["size_ratio"] == pytest.approx(0.4, abs=0.01)
    assert f"it needs {texts.format_gb(small['gb'])}" in words
    # the size named is the slider's value (rounded down to 3 decimals), never rounded up past it
    shown = texts.slider_ratio(answer["best"]["size_ratio"])
    assert f"size {shown:.3f} in {answer['best']['format']}" in words
    assert shown <= answer["best"]["size_ratio"]


def test_one_gb_format_everywhere():
    from acip_core.serving import texts
    from acip_core.system.units import format_gb, gb_up

    assert format_gb(0.38301) == "0.384 GB" and gb_up(0.38301) == 0.384
    assert format_gb(0.384) == "0.384 GB" and gb_up(0.384) == 0.384
    assert format_gb(0.38399, left=True) == "0.383 GB" and format_gb(0.384, left=True) == "0.384 GB"
    assert texts.slider_ratio(0.18999) == 0.189 and texts.slider_ratio(0.19) == 0.19


def test_a_family_being_built_does_not_stall_other_sizes(explorer, monkeypatch):
    """The first size of a format builds its family (int4: about a minute on 2 cores); meanwhile other
    visitors' sizes, budget rows and built formats answer at once."""
    import threading
    import time

    any_size = explorer.any_size
    explorer.model(0.5, "float32")  # float32 built before
    real, started = any_size._build_family, threading.Event()

    def slow(format):
        started.set()
        time.sleep(3)
        return real(format)

    monkeypatch.setattr(any_size, "_build_family", slow)
    any_size._families.pop("int8", None)
    builder = threading.Thread(target=lambda: explorer.model(0.7, "int8"))
    builder.start()
    assert started.wait(10)
    t = time.perf_counter()
    explorer.model(0.6, "float32")
    explorer.size_for(0.45)
    explorer.size_for_budget(0.001, "float32")
    assert time.perf_counter() - t < 1.5  # not the 3 s build
    builder.join()
    assert any_size.has_family("int8")

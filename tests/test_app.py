"""The Gradio app: importing it launches nothing; end to end through gradio_client on the tiny artifact."""

import subprocess
import sys

import gradio as gr
import pytest
import torch


def test_import_does_not_launch():
    code = ("import time, app, gradio as gr; t = time.perf_counter(); "
            "assert not gr.Blocks.__dict__.get('is_running'); "
            "assert not [t for t in __import__('threading').enumerate() if t.name.startswith('load ')]; "
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def _config(tiny_artifact, tmp):
    from acip_core.serving.studio import StudioConfig

    return StudioConfig(default_artifact=str(tiny_artifact), precomputed=tmp / "precomputed",
                        runs=tmp / "runs", artifact_dirs=[str(tiny_artifact)], downloads=tmp / "downloads")


def test_build_demo_returns_blocks_with_named_endpoints(tiny_artifact, tmp_path):
    import app

    demo = app.build_demo(_config(tiny_artifact, tmp_path))
    assert isinstance(demo, gr.Blocks)
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"start", "size", "budget", "chat", "sweep", "perplexity", "lm_eval", "export", "score_start",
            "score_cancel", "score_resume", "score_poll", "cancel"} <= names


def test_a_stop_pressed_while_a_job_waits_drops_it_at_its_turn(tiny_artifact, tmp_path):
    """Stop/Cancel pressed while the job waits in the queue: the stop event was cleared when the job
    started, so it ran in full. A job that entered the queue before the press is now dropped; one that
    entered after it runs (a Stop pressed earlier never cancels the next message)."""
    import asyncio
    import contextlib
    import time
    from types import SimpleNamespace

    import app_handlers
    from app_queue import ARRIVED, ArrivalStamp, arrived

    scopes = []

    async def inner(scope, receive, send):
        scopes.append(scope)

    asyncio.run(ArrivalStamp(inner)({"type": "http"}, None, None))
    request = SimpleNamespace(request=SimpleNamespace(scope=scopes[0]), session_hash="s")
    entered = arrived(request)
    assert isinstance(entered, float) and entered == scopes[0][ARRIVED]
    assert arrived(SimpleNamespace(session_hash="s")) is None  # an in-process call: no arrival known

    stop = app_handlers.StopEvent()
    assert not stop.came_while_queued(entered)
    time.sleep(0.01)
    stop.set()  # pressed while the job that entered at `entered` waits
    assert stop.came_while_queued(entered) and not stop.came_while_queued(None)
    assert not stop.came_while_queued(time.monotonic())  # a job sent after the press runs

    # the handlers: a measurement and a chat that waited while Stop/Cancel was pressed do nothing
    import app

    h = app.build_demo(_config(tiny_artifact, tmp_path)).handlers
    asyncio.run(ArrivalStamp(inner)({"type": "http"}, None, None))  # the Stop/Cancel request, after it
    pressed = SimpleNamespace(request=SimpleNamespace(scope=scopes[-1]), session_hash="s")
    h.measure_cancel(pressed)
    taken = []
    h.quota.job = lambda *a: taken.append(a) or contextlib.nullcontext()  # a dropped job costs no quota
    out = h.perplexity.__wrapped__(h, str(tiny_artifact), 1.0, "corpus:heldout", 2, 32, "float32",
                                   [], request=request, progress=lambda *a, **k: None)
    assert out[0] == "Measurement cancelled." and not taken
    h.chat_stop(pressed)
    replies = list(h.chat.__wrapped__(h, str(tiny_artifact), 1.0, None, 1.0, False, "hi", [], [], 4, 1.15,
                                      "float32", request=request))
    assert len(replies) == 1 and "stopped before it started" in replies[0][2]
    # a Stop request is dated by its arrival: a message sent just after it runs, however late the
    # Stop's handler ran
    late = app_handlers.StopEvent()
    late.set(at=entered - 1.0)
    assert not late.came_while_queued(entered)


@pytest.fixture(scope="module")
def demo(tiny_artifact, tmp_path_factory):
    import app

    return app.build_demo(_config(tiny_artifact, tmp_path_factory.mktemp("app")))


@pytest.fixture(scope="module")
def client(demo):
    from gradio_client import Client

    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield Client(url, verbose=False)
    finally:
        demo.close()


@pytest.mark.filterwarnings("error:A function .* output values")  # a handler's count must match its outputs
def test_start_loads_the_default_artifact(client, tiny_artifact):
    artifact, status, ratio, metric, summary, layers, heatmap, curve, badge, budget, answer = client.predict(
        api_name="/start")
    assert "**tiny**" in status and "Ready" in status and 0 <= ratio <= 1 and budget > 0
    assert " in " not in status.split("Ready")[0].split("steps")[-1]  # no load time for later visitors
    assert summary["data"][0][0] == "size ratio (target layers)"
    assert layers["headers"][:2] == ["module", "layers"]


def _size(client, tiny_artifact, ratio, metric=None, dtype="float32"):
    # (gradio_client leaves the gr.State inputs and outputs out)
    return client.predict(str(tiny_artifact), ratio, "size ratio", dtype, metric, api_name="/size")


@pytest.mark.filterwarnings("error:A function .* output values")
def test_size_summary(client, tiny_artifact):
    summary, layers, heatmap, curve, badge, budget, answer = _size(client, tiny_artifact, 0.6)
    assert answer == ""  # a size of its own: no budget answer left beside it
    cells = dict(summary["data"])
    assert 0.6 <= float(cells["size ratio (target layers)"]) < 0.62
    assert "B" in cells["weights in float32"] and "int4-g32" in cells["in every format"]
    assert [row[0] for row in layers["data"]][-1] == "all"
    assert badge.startswith("**Selected size 0.6") and "in float32" in badge
    assert budget >= float(cells["weights in float32"].split()[0]) / (1000 if "MB" in cells["weights in float32"] else 1)
    summary, *_rest, badge, _, _ = _size(client, tiny_artifact, 0.6, dtype="int8")  # the format follows
    cells = dict(summary["data"])
    assert "weights in int8" in cells and "in int8" in badge


def test_eval_set_switch_updates_the_summary_and_names_the_set(demo, tiny_artifact):
    h = demo.handlers
    ex = h.explorer(str(tiny_artifact))
    ex.curve = ex.curve.assign(ppl_domain=ex.curve.ppl_heldout * 3)  # a second eval set
    try:
        held = dict(h.on_size(str(tiny_artifact), 0.7, "size ratio", "float32", "ppl_heldout", [], None)[0].values)
        dom = dict(h.on_size(str(tiny_artifact), 0.7, "size ratio", "float32", "ppl_domain", [], None)[0].values)
    finally:
        ex.curve = ex.curve.drop(columns="ppl_domain")
    (k_held,) = [k for k in held if k.startswith("perplexity")]
    (k_dom,) = [k for k in dom if k.startswith("perplexity")]
    assert "held-out handbook text" in k_held and "never seen in calibration" in k_dom
    assert float(dom[k_dom].split()[1]) == pytest.approx(3 * float(held[k_held].split()[1]), rel=0.02)


def test_handlers_fill_or_skip_exactly_the_explore_views(demo, tiny_artifact):
    """size() returns one value per Explore view; the page-load and artifact handlers lead with their
    own outputs and skip the views by the same count (a miscount makes Gradio drop or miss one)."""
    from app_handlers import EXPLORE_VIEWS

    h = demo.handlers
    assert len(h.size(str(tiny_artifact), 0.5, "size ratio", "float32", None, [])) == len(EXPLORE_VIEWS)
    *_, loaded = h.artifact(str(tiny_artifact), 0.5, "size ratio", "float32")
    assert len(loaded) == 4 + len(EXPLORE_VIEWS)  # status, metric, ratio, format
    assert {len(out) for out in h.start()} == {4 + len(EXPLORE_VIEWS)}  # artifact, status, ratio, metric


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "abc", None])
def test_bad_values_are_a_toast_and_change_nothing(demo, tiny_artifact, bad):
    h = demo.handlers
    with pytest.warns(UserWarning, match="size_ratio must be|maximum value|minimum value"):
        assert h.on_size(str(tiny_artifact), bad, "size ratio", "float32", None, [], None) == gr.skip()
    if bad != 1.5:  # 1.5 GB is a fine budget
        ratio, dtype, answer, fitted = h.budget(str(tiny_artifact), bad)  # the answer says why, nothing moves
        assert (ratio, dtype, fitted) == (gr.skip(),) * 3 and answer.startswith("⚠") and "budget" in answer


def test_no_number_field_has_a_gradio_minimum(demo):
    """Gradio's own minimum check covers every output of the event with "Error" (the slider too); the
    handlers check the numbers and answer in words instead (explorer.check_int)."""
    import gradio as gr

    numbers = [b for b in demo.blocks.values() if isinstance(b, gr.Number)]
    assert numbers and all(b.minimum is None for b in numbers)


@pytest.mark.parametrize("value,ok", [(3, 3), (3.0, 3), (0, None), (-2, None), (2.5, None), (None, None),
                                      (float("inf"), None), ("x", None), ("2.5", None), ("4", 4)])
def test_number_fields_are_checked_with_their_name(value, ok):
    from acip_core.serving.checks import check_int

    if ok is not None:
        assert check_int(value, 1, None, "steps") == ok
    else:
        with pytest.raises(ValueError, match="steps"):
            check_int(value, 1, None, "steps")


def test_budget_answers_for_every_dtype_and_picks_the_best(client, demo, tiny_artifact):
    ex = demo.handlers.explorer(str(tiny_artifact))
    gb = ex.size_for(1.0)["gb_by_format"]["bfloat16"]
    ratio, dtype, answer = client.predict(str(tiny_artifact), gb, api_name="/budget")
    assert ratio == 1.0 and dtype == "bfloat16"  # only bfloat16 fits the full size in its bytes
    assert "| float32 |" in answer and "| bfloat16 **(best)** |" in answer and " left" not in answer.split("|")[0]
    assert "MB |" in answer or "GB |" in answer
    ratio, dtype, answer, fitted = demo.handlers.budget(str(tiny_artifact), 1e-9)
    assert (ratio, dtype, fitted) == (gr.skip(),) * 3 and "smaller than the smallest model" in answer


def test_fine_tuning_a_size_with_nothing_to_tune_says_fine_tunings_reason_and_starts_no_run(demo, tiny_artifact,
                                                                                             monkeypatch):
    """The handler restates no rule of fine-tuning: its own (finetune.check_tunable, asked by
    Studio.start_finetune before a run is launched) answers at once, as a toast."""
    warned, started = [], []
    monkeypatch.setattr("app_handlers.gr.Warning", lambda m, **k: warned.append(m))
    h = demo.handlers
    monkeypatch.setattr(h.app.jobs, "start_finetune", lambda *a, **k: started.append((a, k)))
    assert h.finetune_start(str(tiny_artifact), 1.0, "float32", "kd", 3) == gr.skip()
    assert warned and "nothing to fine-tune" in warned[0] and not started
    h.finetune_start(str(tiny_artifact), 0.4, "int8", "kd", 3)  # layers run factorized there: handed on
    (name, folder, ratio), kw = started[0]
    assert folder == str(tiny_artifact) and ratio == 0.4 and kw["format"] == "int8" and name.startswith("ft-0.")


def test_a_gigabyte_figure_reads_in_mb_below_a_hundredth_rounded_to_the_safe_side():
    from acip_core.system.units import format_gb

    assert format_gb(0.0042) == "4.2 MB" and format_gb(0.25) == "0.250 GB"
    assert format_gb(0.00004) == "0.1 MB" and format_gb(0.00004, left=True) == "0.0 MB"  # a need up, a rest down
    assert format_gb(0.00426) == "4.3 MB" and format_gb(0.00426, left=True) == "4.2 MB"
    assert format_gb(1e308) == "1e+308 GB"  # a visitor's huge budget: not 309 digits


def test_chat_streams_text(client, demo, tiny_artifact):
    job = client.submit(str(tiny_artifact), 0.7, str(tiny_artifact), 1.0, True, "Debian packages", [], [], 10,
                        1.1, "float32", api_name="/chat")
    outputs = list(job)
    hist_a, hist_b, speed, box = job.result()
    assert len(outputs) >= 2 and box == ""
    assert hist_a[0]["role"] == "user" and hist_a[-1]["role"] == "assistant" and hist_a[-1]["content"]
    assert hist_b[-1]["content"] and "tok/s" in speed and "**B** size 1.000" in speed
    assert "**A** size 0.7" in speed  # the size used is the one asked for
    with pytest.warns(UserWarning, match="empty"):  # a toast; the conversation stays
        assert list(demo.handlers.chat(str(tiny_artifact), 0.7, None, 1.0, False, " \x00 ", [], [], 10, 1.1,
                                       "float32")) == [gr.skip()]


def test_chat_says_when_a_format_is_prepared_first(demo, tiny_artifact):
    """The first chat in a format whose factors are not yet quantized says so while it waits."""
    ex = demo.handlers.explorer(str(tiny_artifact))
    ex.any_size._families.pop("bfloat16", None)
    assert not ex.format_ready("bfloat16")
    args = (str(tiny_artifact), 0.7, None, 1.0, False, "Debian", [], [], 4, 1.1, "bfloat16")
    first = next(iter(demo.handlers.chat(*args)))
    assert first[2].startswith("preparing bfloat16 for ") and "first use" in first[2]
    list(demo.handlers.chat(*args))
    assert ex.format_ready("bfloat16") and next(iter(demo.handlers.chat(*args)))[2] == "generating…"


def test_sweep_answers_one_prompt_at_every_size(demo, tiny_artifact):
    frames = list(demo.handlers.sweep(str(tiny_artifact), "1.0:0.6:0.2", "Debian", 4, "float32"))
    last = frames[-1]
    assert list(last["size"]) == ["1.000", "0.800", "0.600"] or list(last["size"])[0] == "1.000"
    assert len(last) == 3 and all(last["reply"]) and all(last["tok/s"])
    with pytest.warns(UserWarning, match="sizes must be"):
        assert list(demo.handlers.sweep(str(tiny_artifact), "big", "x", 4, "float32")) == [gr.skip()]


def test_quick_perplexity_is_per_session(client, demo, tiny_artifact):
    text, results, csv_path = client.predict(str(tiny_artifact), 0.7, "corpus:heldout", 2, 128, "float32",
                                             api_name="/perplexity")
    assert "Perplexity **" in text and "±" in text and results["headers"].count("perplexity") == 1
    assert "Only 2 windows" in text or "cannot tell them apart" in text
    assert len(results["data"]) == 1 and str(csv_path).endswith(".csv")
    import pandas as pd

    frame = pd.read_csv(csv_path)
    assert frame.windows.dtype.kind == "i" and len(frame.time.iloc[0]) == 19  # "YYYY-MM-DD HH:MM:SS"
    from gradio_client import Client

    same = client.predict(str(tiny_artifact), 0.7, "corpus:heldout", 2, 128, "float32", api_name="/perplexity")
    assert len(same[1]["data"]) == 2  # this session keeps its rows
    other = Client(client.src, verbose=False)  # another visitor starts with none of them
    again = other.predict(str(tiny_artifact), 0.7, "corpus:heldout", 2, 128, "float32", api_name="/perplexity")
    assert len(again[1]["data"]) == 1


def test_unknown_artifact_is_refused(demo):
    with pytest.warns(UserWarning, match="not one of the available artifacts"):
        assert demo.handlers.on_size("/etc", 0.5, "size ratio", "float32", None, [], None) == gr.skip()


def test_export_reloads_with_transformers_and_gives_the_same_greedy_tokens(client, demo, tiny_artifact, tmp_path):
    import zipfile

    from transformers import AutoModelForCausalLM

    import app

    text, zip_path = client.predict(str(tiny_artifact), 0.6, next(iter(app.EXPORT_KINDS)),
                                    "float32", api_name="/export")
    assert "Exported size" in text and "params stored" in text
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ex = demo.handlers.explorer(str(tiny_artifact))
    ids = ex.tokenizer("The Debian system", return_tensors="pt").input_ids
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                  repetition_penalty=1.15,  # the app's setting, which the export carries in generation_config.json
                  pad_token_id=ex.tokenizer.eos_token_id)
    with torch.no_grad():
        ours = ex.model(0.6).generate(**kwargs)
        theirs = loaded.generate(**kwargs)
    assert torch.equal(ours, theirs)


def test_score_tab_starts_polls_and_cancels_a_run(client, tiny_llama):
    import time

    table, runs, plot, text = client.predict("app-run", tiny_llama, "corpus:train", 400, "whitened", 0.4, 2, 32,
                                             5, api_name="/score_start")
    assert table["data"][0][0] == "app-run" and "app-run" in text
    deadline = time.time() + 180
    while time.time() < deadline:  # (gradio_client leaves the gr.State input/output out)
        table, _, _, text, _, _ = client.predict("app-run", api_name="/score_poll")
        if table["data"][0][2] not in (None, "", "NaN") and float(table["data"][0][2]) >= 1:
            break
        time.sleep(1)
    assert table["data"][0][1] in ("running", "evaluating"), table
    table, plot, text = client.predict("app-run", api_name="/score_cancel")
    assert table["data"][0][1] == "cancelled" and "Resume" in text
    assert "continues after step" in text or "starts again at step 1" in text


def test_start_without_any_artifact_says_what_to_do(tmp_path):
    import app
    from acip_core.serving.studio import StudioConfig

    demo = app.build_demo(StudioConfig(default_artifact=str(tmp_path / "missing"), precomputed=tmp_path / "none",
                                       runs=tmp_path / "runs", downloads=tmp_path / "dl"))
    (out,) = list(demo.handlers.start())
    assert "is not there yet" in out[1] and "Score" in out[1]


def test_a_broken_artifact_is_reported_in_the_status_line(tmp_path, tiny_artifact):
    import shutil

    import app
    from acip_core.serving.studio import StudioConfig

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    (broken / "scores.safetensors").write_bytes(b"garbage")
    demo = app.build_demo(StudioConfig(default_artifact=str(broken), precomputed=tmp_path / "none",
                                       runs=tmp_path / "runs", downloads=tmp_path / "dl"))
    outs = list(demo.handlers.start(progress=None))
    assert "Could not load the artifact" in outs[-1][1] and "corrupted" in outs[-1][1]


def test_downloads_are_one_copy_and_bounded(tmp_path):
    import os
    import time

    from acip_core.serving.studio import prune

    for i, age in enumerate((7200, 30, 20, 10)):
        one = tmp_path / "exports" / f"e{i}"
        one.mkdir(parents=True)
        (one / "m.zip").write_bytes(b"x" * 1000)
        os.utime(one, (time.time() - age, time.time() - age))
    prune(tmp_path, max_bytes=2500, max_age_s=3600)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["e2", "e3"]  # too old, then oldest


def test_a_download_is_served_from_where_it_was_written(tmp_path):
    """The default download folder is inside Gradio's cache, so Gradio does not keep a second copy."""
    from acip_core.serving.studio import Studio, StudioConfig

    app = Studio(StudioConfig(runs=tmp_path / "runs"))
    path = app.download_dir("exports") / "m.zip"
    path.write_bytes(b"zip")
    try:
        assert gr.File().move_resource_to_block_cache(str(path)) == str(path)
    finally:
        import shutil
        shutil.rmtree(path.parent)


def test_a_hub_id_that_cannot_load_is_refused_at_once(tmp_path, monkeypatch):
    import time

    from acip_core.serving.studio import check_model_source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not reachable"):
        check_model_source("someone/no-such-model", reachable=lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        check_model_source("someone/no-such-model")
    assert time.perf_counter() - start < 5
    check_model_source("smollm2-135m-instruct")  # embedded
    check_model_source(str(tmp_path))  # a local folder: load_base checks it


def test_resume_says_what_it_will_do(tmp_path):
    import json

    import app
    from acip_core.serving.studio import StudioConfig

    demo = app.build_demo(StudioConfig(default_artifact=str(tmp_path / "none"), precomputed=tmp_path / "p",
                                       runs=tmp_path / "runs", downloads=tmp_path / "dl"))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    assert "starts again at step 1" in demo.handlers.resume_note("r1")
    (run / "checkpoint.json").write_text(json.dumps(dict(step=30, phase="acip")))
    assert "continues after step 30" in demo.handlers.resume_note("r1")


def test_a_size_below_the_curve_is_warned_about(demo, tiny_artifact):
    summary, layers, heatmap, curve, badge, budget, answer = demo.handlers.on_size(
        str(tiny_artifact), 0.1, "size ratio", "float32", None, [], None)
    assert "Below the smallest measured size (0.40)" in badge
    assert "warning" in list(summary.iloc[:, 0])
    summary, *_, badge, _, _ = demo.handlers.on_size(str(tiny_artifact), 0.5, "size ratio", "float32", None, [], None)
    assert "Below" not in badge


def test_streamed_updates_are_throttled_but_the_last_always_comes():
    import time

    from acip_core.serving.texts import throttled

    def fast():
        for i in range(50):
            time.sleep(0.005)
            yield i

    start = time.perf_counter()
    out = list(throttled(fast(), every=0.1))
    elapsed = time.perf_counter() - start  # ≥ 0.25 s; longer on a busy machine
    assert out[-1] == 49 and 2 <= len(out) <= elapsed / 0.1 + 2 and len(out) < 50
    assert list(throttled(iter([]), 0.1)) == [] and list(throttled(iter([7]), 10)) == [7]


@pytest.mark.parametrize("token, interactive", [(None, False), ("s3cret", True)])
def test_start_and_resume_are_off_where_scoring_is(tiny_artifact, tmp_path, monkeypatch, token, interactive):
    """A public Space without the admin token refuses every run: its Start/Resume buttons are disabled
    (the tab's text says why) instead of inviting a click that can only be refused."""
    import app

    monkeypatch.setenv("ACIP_PUBLIC", "1")
    if token:
        monkeypatch.setenv("ACIP_ADMIN_TOKEN", token)
    else:
        monkeypatch.delenv("ACIP_ADMIN_TOKEN", raising=False)
    demo = app.build_demo(_config(tiny_artifact, tmp_path))
    buttons = {b.value: b for b in demo.blocks.values() if isinstance(b, gr.Button)}
    assert buttons["Start run"].interactive is interactive and buttons["Resume run"].interactive is interactive
    assert buttons["fine-tune this size"].interactive is interactive
    assert buttons["Cancel run"].interactive is not False  # a visitor's own runs stay under their control

"""The Gradio app: importing it launches nothing; end to end through gradio_client on the tiny artifact."""

import importlib.util
import subprocess
import sys

import gradio as gr
import pytest
import torch


def test_import_does_not_launch():
    code = ("import time, app, gradio as gr; t = time.perf_counter(); "
            "assert not gr.Blocks.__dict__.get('is_running'); "
            "assert not app._EXPLORERS, 'nothing loaded on import'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_build_demo_returns_blocks_with_named_endpoints(tiny_artifact):
    import app

    demo = app.build_demo([tiny_artifact])
    assert isinstance(demo, gr.Blocks)
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"start", "size", "budget", "chat", "perplexity", "lm_eval", "export", "score_start",
            "score_cancel", "score_resume", "score_poll", "cancel"} <= names


@pytest.fixture(scope="module")
def client(tiny_artifact, tmp_path_factory):
    from gradio_client import Client

    import app
    from acip_core.jobs import ScoringJobs

    app.DEFAULT_ARTIFACT = str(tiny_artifact)
    app.JOBS = ScoringJobs(tmp_path_factory.mktemp("runs"))
    app.PRECOMPUTED = tmp_path_factory.mktemp("precomputed")  # never the real (large) artifacts
    demo = app.build_demo([tiny_artifact])
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield Client(url, verbose=False)
    finally:
        demo.close()


def test_start_loads_the_default_artifact(client, tiny_artifact):
    artifact, status, ratio, budget, metric, summary, layers, heatmap, curve, badge = client.predict(
        api_name="/start")
    assert "Loaded **tiny**" in status and 0 <= ratio <= 1 and budget > 0
    assert summary["data"][0][0] == "size ratio (target layers)"
    assert layers["headers"][:2] == ["module", "layers"]


def test_size_summary(client, tiny_artifact):
    summary, layers, heatmap, curve, badge = client.predict(str(tiny_artifact), 0.6, "size ratio", "float32", None,
                                                     api_name="/size")
    cells = dict(summary["data"])
    assert 0.6 <= float(cells["size ratio (target layers)"]) < 0.62
    assert "GB" in cells["weights in bfloat16"]
    assert [row[0] for row in layers["data"]][-1] == "all"
    assert badge.startswith("**Selected size 0.6")


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_bad_size_is_an_error_not_a_crash(client, tiny_artifact, bad):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="size_ratio must be within|maximum value|minimum value"):
        client.predict(str(tiny_artifact), bad, "size ratio", "float32", None, api_name="/size")
    client.predict(str(tiny_artifact), 0.5, "size ratio", "float32", None, api_name="/size")  # still up


@pytest.mark.parametrize("bad", [float("nan"), "abc", None])
def test_handlers_turn_bad_values_into_gr_errors(client, tiny_artifact, bad):
    import app

    with pytest.raises(gr.Error, match="size_ratio must be"):
        app.on_size(str(tiny_artifact), bad, "size ratio", "float32", None)
    with pytest.raises(gr.Error, match="budget"):
        app.on_budget(str(tiny_artifact), bad, "float32")


def test_budget_moves_the_slider(client, tiny_artifact):
    import app

    ex = app.get_explorer(str(tiny_artifact))
    ratio, text = client.predict(str(tiny_artifact), ex.size_for(1.0)["gb_bfloat16"], "bfloat16",
                                 api_name="/budget")
    assert ratio == 1.0 and "GB left" in text
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="smallest"):
        client.predict(str(tiny_artifact), 1e-9, "bfloat16", api_name="/budget")


def test_chat_streams_text(client, tiny_artifact):
    job = client.submit(str(tiny_artifact), 0.7, 1.0, True, "Debian packages", [], [], 10, 1.1, "float32",
                        api_name="/chat")
    outputs = list(job)
    hist_a, hist_b, speed, box = job.result()
    assert len(outputs) >= 2 and box == ""
    assert hist_a[0]["role"] == "user" and hist_a[-1]["role"] == "assistant" and hist_a[-1]["content"]
    assert hist_b[-1]["content"] and "tok/s" in speed and "**B** size 1.000" in speed
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="empty"):
        client.predict(str(tiny_artifact), 0.7, 1.0, False, " \x00 ", [], [], 10, 1.1, "float32",
                       api_name="/chat")


def test_quick_perplexity_adds_a_row(client, tiny_artifact):
    text, results, csv_path = client.predict(str(tiny_artifact), 0.7, "corpus:heldout", 2, 128, "float32",
                                             api_name="/perplexity")
    assert "Perplexity **" in text and results["headers"].count("perplexity") == 1
    assert len(results["data"]) >= 1 and str(csv_path).endswith(".csv")


def test_unknown_artifact_is_refused(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not one of the available artifacts|not in the list of choices"):
        client.predict("/etc", 0.5, "size ratio", "float32", None, api_name="/size")


@pytest.mark.skipif(importlib.util.find_spec("acip_core.export") is None,
                    reason="acip_core/export.py has not landed yet")
def test_export_reloads_with_transformers_and_gives_the_same_greedy_tokens(client, tiny_artifact, tmp_path):
    import zipfile

    from transformers import AutoModelForCausalLM

    import app

    text, zip_path = client.predict(str(tiny_artifact), 0.6, "low-rank (smallest; trust_remote_code)",
                                    "float32", api_name="/export")
    assert "Exported size" in text
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ex = app.get_explorer(str(tiny_artifact))
    ids = ex.tokenizer("The Debian system", return_tensors="pt").input_ids
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                  pad_token_id=ex.tokenizer.eos_token_id)
    with torch.no_grad():
        ours = ex.model(0.6).generate(**kwargs)
        theirs = loaded.generate(**kwargs)
    assert torch.equal(ours, theirs)


def test_score_tab_starts_polls_and_cancels_a_run(client, tiny_llama):
    import time

    table, runs, plot, text = client.predict("app-run", tiny_llama, "corpus:train", 400, "whitened", 0.4, 2, 32,
                                             api_name="/score_start")
    assert table["data"][0][0] == "app-run" and "app-run" in text
    deadline = time.time() + 180
    while time.time() < deadline:  # (gradio_client leaves the gr.State input/output out)
        table, _, _, text, _ = client.predict("app-run", api_name="/score_poll")
        if table["data"][0][2] not in (None, "", "NaN") and float(table["data"][0][2]) >= 1:
            break
        time.sleep(1)
    assert table["data"][0][1] in ("running", "evaluating"), table
    table, plot, text = client.predict("app-run", api_name="/score_cancel")
    assert table["data"][0][1] == "cancelled" and "resume" in text


def test_start_without_any_artifact_says_what_to_do(monkeypatch, tmp_path):
    import app
    from acip_core.jobs import ScoringJobs

    monkeypatch.setattr(app, "DEFAULT_ARTIFACT", str(tmp_path / "missing"))
    monkeypatch.setattr(app, "PRECOMPUTED", tmp_path / "none")
    monkeypatch.setattr(app, "JOBS", ScoringJobs(tmp_path / "runs"))
    monkeypatch.setattr(app, "_EXTRA_ARTIFACTS", [])
    (out,) = list(app.on_start())
    assert "is not there yet" in out[1] and "Score" in out[1]


def test_a_broken_artifact_is_reported_in_the_status_line(monkeypatch, tmp_path, tiny_artifact):
    import shutil

    import app

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    (broken / "scores.safetensors").write_bytes(b"garbage")
    monkeypatch.setattr(app, "DEFAULT_ARTIFACT", str(broken))
    outs = list(app.on_start())
    assert "Could not load the artifact" in outs[-1][1] and "corrupted" in outs[-1][1]

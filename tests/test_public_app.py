"""The app in public mode (ACIP_PUBLIC=1), driven as strangers do: gradio_client sessions and plain
HTTP against a launched demo on the tiny artifact."""

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request

import gradio as gr
import pytest

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def public_app(tiny_artifact, tmp_path_factory):
    """(url, runs folder): the app launched in public mode with an admin token, as app.py launches it."""
    import app
    from acip_core.studio import StudioConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACIP_PUBLIC", "1")
        mp.setenv("ACIP_ADMIN_TOKEN", TOKEN)
        mp.setenv("ACIP_STUDIO_CACHE", str(tmp_path_factory.mktemp("cache")))
        runs = tmp_path_factory.mktemp("public-runs")
        toasts = []
        warn = gr.Warning

        def record(message, *args, **kwargs):  # the app shows refusals as toasts (never hides the page)
            toasts.append(str(message))
            return warn(message, *args, **kwargs)

        mp.setattr(gr, "Warning", record)
        demo = app.build_demo(StudioConfig(default_artifact=str(tiny_artifact), runs=runs,
                                           precomputed=tmp_path_factory.mktemp("precomputed"),
                                           downloads=tmp_path_factory.mktemp("downloads")))
        demo.toasts = toasts
        _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                        **app.launch_options())
        try:
            yield url, runs, demo
        finally:
            demo.close()


@contextlib.contextmanager
def _refused(public_app, pattern):
    """The call inside is refused: the visitor gets a toast matching `pattern` (and nothing else)."""
    toasts = public_app[2].toasts
    del toasts[:]
    yield
    deadline = time.time() + 30
    while time.time() < deadline and not any(re.search(pattern, t) for t in toasts):
        time.sleep(0.1)
    assert any(re.search(pattern, t) for t in toasts), toasts


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _score_start(client, model, data, steps=50, batch=2, seq=64, token=TOKEN, name="r"):
    return client.predict(name, model, data, steps, "whitened", 0.4, batch, seq, 150, token, None,
                          api_name="/score_start")


def test_the_page_says_what_is_limited_and_which_device_scores(public_app):
    _, _, demo = public_app
    text = " ".join(str(getattr(b, "value", "")) for b in demo.blocks.values())
    assert "Scoring runs on **cpu**" in text and "**Public Space.**" in text and "no server paths" in text
    assert demo.delete_cache == (3600, 3600)  # uploads and downloads leave Gradio's cache after an hour


def test_scoring_needs_the_admin_token(public_app):
    url, runs, _ = public_app
    client = _client(url)
    for token in ("", "wrong"):
        with _refused(public_app, "admin token"):
            _score_start(client, "smollm2-135m-instruct", "corpus:train", token=token)
    assert list(runs.iterdir()) == []


@pytest.mark.parametrize("model,data", [("/etc", "corpus:train"), ("smollm2-135m-instruct", "/etc/passwd"),
                                        ("smollm2-135m-instruct", "/etc/services"),
                                        ("../precomputed/x", "corpus:train")])
def test_server_paths_are_refused_with_a_clear_message(public_app, model, data):
    url, runs, _ = public_app
    with _refused(public_app, "server paths"):
        _score_start(_client(url), model, data)
    assert list(runs.iterdir()) == []  # a refused start creates nothing


@pytest.mark.parametrize("batch,seq", [(16, 64), (2, 4096)])
def test_oversize_batch_or_sequence_is_refused(public_app, batch, seq):
    url, runs, _ = public_app
    with _refused(public_app, "above the limit"):
        _score_start(_client(url), "smollm2-135m-instruct", "corpus:train", batch=batch, seq=seq)
    assert list(runs.iterdir()) == []


def test_another_session_cannot_cancel_or_delete_a_run(public_app):
    url, runs, _ = public_app
    folder = runs / "theirs"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "acip_core", str(folder)])
    try:
        (folder / "run.json").write_text(json.dumps(dict(name="theirs", args=["x"], model="m", created=1.0,
                                                         pid=proc.pid, owner="session-someone-else", config={})))
        stranger = _client(url)
        stranger.predict(api_name="/runs")  # the page load fills this session's run list
        with _refused(public_app, "belongs to whoever started it"):
            stranger.predict("theirs", "", api_name="/score_cancel")
        with _refused(public_app, "belongs to whoever started it"):
            stranger.predict("theirs", "", api_name="/score_delete")
        table, _plot, _text = stranger.predict("theirs", TOKEN, api_name="/score_cancel")  # the owner's token
        assert table["data"][0][1] == "cancelled"
    finally:
        proc.kill()
        proc.wait()
    stranger.predict("theirs", TOKEN, api_name="/score_delete")
    assert not folder.exists()


def test_markdown_in_a_model_name_is_shown_as_text(public_app):
    url, runs, demo = public_app
    evil = "![beacon](http://evil.example/b.png) [login](http://phish.example) <img src=x>"
    folder = runs / "failed"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(dict(name="failed", args=["x"], model=evil, created=1.0, config={})))
    (folder / "output.log").write_text(f"```\n{evil}\nerror: could not load {evil}\n")
    demo.handlers.app.jobs._snapshot = None  # the folder was made a moment ago, not by a start
    viewer = _client(url)
    viewer.predict(api_name="/runs")
    _table, _plot, text = viewer.predict("failed", api_name="/score_view")
    message, _, tail = text.partition("```")
    assert "failed" in message and "could not load" in message
    assert "](" not in message and "![" not in message and "<img" not in message
    # the output tail is a code block (shown verbatim) that a backtick fence inside it cannot close
    assert tail.count("```") == 1 and "```" not in tail.removesuffix("```")


def test_the_runs_folder_is_scanned_once_per_poll(public_app):
    _, _, demo = public_app
    jobs = demo.handlers.app.jobs
    jobs._snapshot = None
    before = jobs.scans
    demo.handlers.score_poll(None, {})
    assert jobs.scans == before + 1


def test_a_forged_long_history_is_refused(public_app, tiny_artifact):
    url, _, _ = public_app
    client = _client(url)
    client.predict(api_name="/start")
    forged = [dict(role="user", content=[dict(type="text", text="x" * 80_000)]),
              dict(role="assistant", content=[dict(type="text", text="y")])]  # as the page sends it
    name = public_app[2].handlers.app.name_of(str(tiny_artifact))  # the selectors carry names
    with _refused(public_app, "history holds a user message of 80,000 characters"):
        client.predict(name, 1.0, name, 1.0, False, "hi", forged, [], 4, 1.15, "float32", api_name="/chat")


def test_artifacts_are_chosen_by_name_and_a_server_path_is_refused(public_app, tiny_artifact):
    """Public mode: the selectors offer names, never paths; a path (even a listed artifact's) is refused."""
    url, _, demo = public_app
    client = _client(url)
    client.predict(api_name="/start")
    studio = demo.handlers.app
    assert all(value == label and "/" not in value for label, value in studio.artifact_choices())
    name = studio.name_of(str(tiny_artifact))
    assert name and client.predict(name, 0.7, "size ratio", "float32", None, api_name="/size")
    for path in (str(tiny_artifact), "/etc/passwd", "../../etc"):
        with pytest.raises(Exception) as err:  # Gradio's own check: not one of the choices
            client.predict(path, 0.7, "size ratio", "float32", None, api_name="/size")
        offered = str(err.value).rpartition("choices:")[2]  # what the refusal lists: names, no server path
        assert offered and "/" not in offered and name in offered
        with _refused(public_app, "not one of the available artifacts"):  # and the handler's, behind it
            assert demo.handlers.on_size(path, 0.7, "size ratio", "float32", None, [], None) == gr.skip()


def test_an_upload_over_the_cap_is_refused_by_gradio(public_app):
    url, _, _ = public_app
    boundary = "acipboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + b"x" * (10 * 10**6 + 1000) + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 413

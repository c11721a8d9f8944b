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
    from acip_core.serving.studio import StudioConfig

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


# -- issue 28: bounded uploads, quotas by address, summaries in the log -----------------------------
def _upload(url, payload: bytes, name="cal.txt"):
    boundary = "acipboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_file_with_nul_bytes_is_refused_at_upload_and_not_kept(public_app):
    url, _, demo = public_app
    _fresh_upload_budget()  # the test's own upload budget (other tests upload too)
    status, paths = _upload(url, b"plain text\n" * 10)
    assert status == 200 and len(paths) == 1 and open(paths[0], "rb").read().startswith(b"plain text")
    before = {p for p in _gradio_files(demo)}
    status, text = _upload(url, b"text then \0 binary" * 10, name="bin.txt")
    assert status == 400 and "NUL bytes" in text
    assert {p for p in _gradio_files(demo)} == before  # nothing of it was kept


def _fresh_upload_budget():
    from acip_core.serving import public
    from app_uploads import UploadGuard

    guard = UploadGuard.latest
    guard.quota = public.UploadQuota(guard.limits.visitor_upload_bytes, guard.limits.total_upload_bytes)


def _gradio_files(demo):
    import pathlib

    root = pathlib.Path(demo.server_app.uploaded_file_dir)
    return [p for p in root.rglob("*") if p.is_file()]


def test_an_upload_flood_from_one_address_is_refused_within_its_hourly_bytes(public_app):
    """10 files of 9 MB were taken in 1.6 s before; now one address gets Limits.visitor_upload_bytes
    (30 MB) an hour, counted before the body is read."""
    from acip_core.serving import public

    url, _, demo = public_app
    _fresh_upload_budget()
    lim = public.limits()
    accepted, codes = 0, []
    for i in range(6):
        payload = (f"file {i} " * 1_300_000).encode()[:9 * 10**6]
        status, _ = _upload(url, payload, name=f"f{i}.txt")
        codes.append(status)
        accepted += len(payload) if status == 200 else 0
    assert 429 in codes and codes.index(429) >= 1, codes
    assert accepted <= lim.visitor_upload_bytes and all(c == 429 for c in codes[codes.index(429):]), codes


def test_refused_requests_do_not_count_and_a_new_session_shares_its_address_quota(public_app, tiny_artifact):
    from acip_core.serving import public

    url, _, demo = public_app
    h = demo.handlers
    old, h.quota = h.quota, public.SessionQuota(2)
    try:
        first = _client(url)
        first.predict(api_name="/start")
        name = h.app.name_of(str(tiny_artifact))
        for _ in range(4):  # refused for its input: never counted
            with _refused(public_app, "limit must be a whole number in \\[1, 100\\]"):
                first.predict(name, 0.7, ["arc_easy"], 500, 8, "float32", api_name="/lm_eval")
        for _ in range(2):
            text, *_ = first.predict(name, 0.7, "corpus:heldout", 1, 128, "float32", api_name="/perplexity")
            assert "Perplexity **" in text
        second = _client(url)  # a fresh session hash, the same address
        second.predict(api_name="/start")
        with _refused(public_app, "this address has started 2 measurements"):
            second.predict(name, 0.7, "corpus:heldout", 1, 128, "float32", api_name="/perplexity")
    finally:
        h.quota = old


def test_a_malformed_history_is_refused_with_a_summary_in_the_log(public_app, tiny_artifact, capfd, caplog):
    import logging

    url, _, demo = public_app
    client = _client(url)
    client.predict(api_name="/start")
    name = demo.handlers.app.name_of(str(tiny_artifact))
    forged = [dict(role="user", content=[dict(type="nonsense", foo="z" * 100)]) for _ in range(3000)]
    payload = len(json.dumps(forged))
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="acip_studio"):
        with pytest.raises(Exception, match="not in the chat's message format"):
            client.predict(name, 1.0, name, 1.0, False, "hi", forged, [], 4, 1.15, "float32", api_name="/chat")
    out, err = capfd.readouterr()
    logged = len(out) + len(err) + len(caplog.text)
    assert payload > 400_000 and logged < 5_000, logged
    assert "malformed chat history refused: 3000 messages" in caplog.text


def test_the_chat_panes_are_gradios_chatbot_showing_plain_text(public_app):
    """A subclass must still be drawn by the page's chatbot, with Markdown and HTML off."""
    _, _, demo = public_app
    panes = [c for c in demo.config["components"] if c["type"] == "chatbot"]
    assert len(panes) == 2 and all(c["type"] == "chatbot" for c in panes), panes
    assert all(c["props"]["render_markdown"] is False and c["props"]["sanitize_html"] for c in panes)


def _post_json(url, payload: bytes):
    request = urllib.request.Request(url, data=payload, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_file_named_by_url_in_a_payload_is_refused_before_gradio_fetches_it(public_app):
    """Gradio downloads any http(s) `path` of a FileData in an event's payload (no size bound, past the
    upload quota): the app's middleware refuses such a payload, and an oversized one, before that."""
    from app_uploads import MAX_API_BODY

    url, _, demo = public_app
    before = set(_gradio_files(demo))
    remote = {"path": "https://example.invalid/huge.txt", "meta": {"_type": "gradio.FileData"}}
    history = [{"role": "user", "content": [{"type": "file", "file": remote}]}]
    for route, body in (("gradio_api/queue/join", dict(data=["hi", history], fn_index=0, session_hash="x")),
                        ("gradio_api/call/score_upload", dict(data=[remote])),
                        ("gradio_api/run/chat", dict(data=[{"nested": [[{"path": " HTTP://10.0.0.1/x"}]]}]))):
        status, text = _post_json(url + route, json.dumps(body).encode())
        assert status == 400 and "not fetched" in text, (route, status, text)
    status, text = _post_json(url + "gradio_api/queue/join", b"[" + b"0," * (MAX_API_BODY // 2) + b"0]")
    assert status == 413
    assert set(_gradio_files(demo)) == before
    # a payload without a remote file reaches Gradio unchanged (it answers it itself)
    status, text = _post_json(url + "gradio_api/call/score_plan", json.dumps(dict(data=["", 2, 64])).encode())
    assert status == 200 and "event_id" in text, (status, text)

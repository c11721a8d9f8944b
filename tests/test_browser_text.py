"""What a visitor types is shown as text in a real Chromium (issue 28): a string that would fetch a
URL if it were rendered as HTML or Markdown (an `<img>`, a Markdown image) goes into a toast (sweep
sizes, a run name) and into the chat; a local HTTP server counts what the browser asks it for."""

import http.server
import re
import threading
import time

import pytest

from test_browser import ARGS, CHROMIUM, OUT, app_url, browser  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def bait():
    """(url, hits): a local server; hits lists every path the browser requested from it."""
    hits = []

    class Count(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Count)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def _ready_page(chromium, url, width=1400):
    """A new page on the app, once its model is loaded (the status says "Ready.")."""
    page = chromium.new_page(viewport={"width": width, "height": 1000})
    page.goto(url)
    page.get_by_text(re.compile(r"Ready\.")).wait_for(timeout=600_000)
    return page


def _markup(base, what):
    return (f'<img src="{base}/{what}-img.png"> ![x]({base}/{what}-md.png) '
            f'<a href="{base}/{what}-a">link</a> **bold**')


def test_visitor_strings_are_text_in_toasts_and_chat(app_url, browser, bait):  # noqa: F811
    url, name = app_url
    base, hits = bait
    page = _ready_page(browser, url)
    try:
        # sweep sizes: refused, and the refusal (a toast) echoes them
        page.get_by_role("tab", name="Sweep").click()
        sizes = page.locator("#sweep-sizes textarea, #sweep-sizes input").first
        sizes.fill(_markup(base, "sweep"))
        page.locator("#run-sweep").click()
        page.get_by_text(re.compile("sizes must be numbers")).first.wait_for(timeout=60_000)
        assert page.get_by_text(re.compile(r"<img src=")).count() >= 1  # shown, as text

        # a run name: refused by its characters, echoed in the toast
        page.get_by_role("tab", name="Score").click()
        run = page.get_by_label("run name")
        run.fill(_markup(base, "run"))
        page.get_by_role("button", name="Start run").click()
        page.get_by_text(re.compile(r"run name|letters, digits", re.I)).first.wait_for(timeout=60_000)

        # chat: the prompt and the reply are text
        page.get_by_role("tab", name="Chat").click()
        max_new = page.locator("#max-new input[type=number]")
        max_new.fill("4")
        max_new.press("Enter")
        box = page.locator("#chat-input textarea")
        box.fill(_markup(base, "chat"))
        box.press("Enter")
        speed = page.locator("#speed")
        deadline = time.time() + 300
        while time.time() < deadline and speed.inner_text().count("done") < 2:
            time.sleep(0.3)
        bubble = page.locator("#chat-a").get_by_text(re.compile(r"<img src=")).first
        try:
            bubble.wait_for(timeout=30_000)
        except Exception:
            page.screenshot(path=OUT / f"{name}-text-failure.png", full_page=True)
            raise AssertionError(f"no text bubble; fetched {hits}; pane: {page.locator('#chat-a').inner_html()[-3000:]}")
        assert "**bold**" in bubble.inner_text()  # not rendered as Markdown either
        assert page.locator("#chat-a img, #chat-b img").count() == 0
        time.sleep(2)  # any fetch the page would make has been made
        page.screenshot(path=OUT / f"{name}-text-not-markup.png", full_page=True)
        assert hits == [], f"the browser fetched {hits}"
    finally:
        page.close()


@pytest.mark.parametrize("width", [1400, 1024])
def test_nothing_is_cut_at_common_widths(app_url, browser, width):  # noqa: F811
    """Numbers and choices are whole at 1024 and 1400 px (a slider's maximum read "25" for 256, the
    B artifact and evaluation-set dropdowns were cut); screenshots of each tab for a look."""
    url, name = app_url
    page = _ready_page(browser, url, width)
    page.locator("#curve .main-svg").first.wait_for(timeout=180_000)
    time.sleep(1)
    cut = """els => els.filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
                     .map(e => (e.closest('[id]') || e).id + '=' + e.value)"""
    try:
        page.screenshot(path=OUT / f"{name}-{width}-explore.png", full_page=True)
        assert page.locator("#metric input").evaluate_all(cut) == []
        page.get_by_text("GB", exact=True).first.click()  # the GB view
        time.sleep(2)
        page.screenshot(path=OUT / f"{name}-{width}-explore-gb.png", full_page=True)
        for tab in ("Chat", "Sweep", "Measure"):
            page.get_by_role("tab", name=tab).click()
            time.sleep(1)
            page.screenshot(path=OUT / f"{name}-{width}-{tab.lower()}.png", full_page=True)
            assert page.locator("input[type=number], #artifact-b input").evaluate_all(cut) == [], tab
    finally:
        page.close()


def test_a_reply_with_markup_is_text_in_the_sweep_grid(app_url, browser, bait, monkeypatch):  # noqa: F811
    """The sweep grid shows replies as the model wrote them: a reply holding HTML or Markdown that
    would fetch a URL is shown as characters, and nothing is fetched (the real handler and grid; only
    the model's reply is fixed, since a small model cannot be made to echo markup)."""
    from acip_core.serving.explorer import Explorer

    url, _ = app_url
    base, hits = bait
    reply = _markup(base, "sweep-reply")

    def markup_sweep(self, ratios, message, max_new_tokens, *args, **kwargs):
        done = []
        for _ in ratios:
            done.append({"text": reply, "done": True, "tokens": 12, "tokens_per_s": 5.0})
            yield list(done)

    monkeypatch.setattr(Explorer, "sweep", markup_sweep)
    page = _ready_page(browser, url)
    try:
        page.get_by_role("tab", name="Sweep").click()
        page.locator("#sweep-sizes textarea, #sweep-sizes input").first.fill("1.0,0.5")
        page.locator("#run-sweep").click()
        grid = page.locator("#sweep-grid")
        deadline = time.time() + 60  # the grid's visible text (its cells keep hidden copies too)
        while time.time() < deadline and "<img src=" not in grid.inner_text():
            time.sleep(0.3)
        shown = grid.inner_text()
        assert f'<img src="{base}/sweep-reply-img.png">' in shown and "**bold**" in shown, shown[-2000:]
        assert page.locator("#sweep-grid img, #sweep-grid a[href^='http']").count() == 0
        time.sleep(2)
        assert hits == [], f"the browser fetched {hits}"
    finally:
        page.close()


def test_entities_typed_in_a_prompt_reach_the_model_as_typed(app_url, browser, monkeypatch):  # noqa: F811
    """`&lt;` typed in a prompt is the four characters `&lt;` for the model, in the turn it is sent and
    in the history of the next (the panes get escaped text, the model reads the inverse: `shown`, `said`)."""
    import app_handlers

    typed = "a &lt; b &amp; <c> &#60;"
    read = []
    real_said = app_handlers.said
    monkeypatch.setattr(app_handlers, "said", lambda history: read.append(real_said(history)) or read[-1])
    url, _ = app_url
    page = _ready_page(browser, url)
    try:
        page.get_by_role("tab", name="Chat").click()
        max_new = page.locator("#max-new input[type=number]")
        max_new.fill("4")
        max_new.press("Enter")
        box = page.locator("#chat-input textarea")
        speed = page.locator("#speed")
        for message in (typed, "next"):
            box.fill(message)
            box.press("Enter")
            deadline = time.time() + 300
            time.sleep(0.5)
            while time.time() < deadline and "done" not in speed.inner_text():
                time.sleep(0.3)
        page.locator("#chat-a").get_by_text(typed, exact=False).first.wait_for(timeout=30_000)  # shown as typed
        user_turns = [m["content"] for m in read[-1] if m["role"] == "user"]
        assert user_turns == [typed], read
    finally:
        page.close()

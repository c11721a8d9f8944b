"""The app in a real Chromium (Playwright): load, drag the size, set a budget, chat. Screenshots go to
test-output/. Runs on the tiny artifact; ACIP_BROWSER_ARTIFACT=folder points it at a real one."""

import os
import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
OUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, request):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install chromium` (as root)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    import app
    from acip_core.jobs import ScoringJobs

    artifact = os.environ.get("ACIP_BROWSER_ARTIFACT") or str(request.getfixturevalue("tiny_artifact"))
    app.DEFAULT_ARTIFACT = artifact
    app.JOBS = ScoringJobs(tmp_path_factory.mktemp("runs"))
    app.PRECOMPUTED = tmp_path_factory.mktemp("precomputed")
    demo = app.build_demo([artifact])
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                    **app.launch_options())
    yield url, Path(artifact).name
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    url, name = app_url
    from playwright.sync_api import sync_playwright

    OUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.shot = lambda step: page.screenshot(path=OUT / f"{name}-{step}.png", full_page=True)
        page.get_by_text(re.compile(r"^Loaded")).wait_for(timeout=600_000)
        yield page
        browser.close()


def _size_cell(page) -> str:
    return page.locator("#summary [data-testid=cell-0-1]").inner_text().strip()  # row 0: size ratio


def _wait_change(read, before, timeout=180):
    """The first new, non-empty value of read() (a table cell is blank while it re-renders)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = read()
        if now and now != before:
            return now
        time.sleep(0.2)
    raise AssertionError(f"still {before!r} after {timeout} s")


def _curve_marker(page) -> str:
    """The current-size line of the curve (a plotly shape): its path moves with the size."""
    return page.locator("#curve .shapelayer path").evaluate_all("els => els.map(e => e.getAttribute('d')).join('|')")


def _wait_plots(page):
    for plot in ("#curve", "#heatmap"):
        page.locator(f"{plot} .main-svg").first.wait_for(timeout=60_000)
    time.sleep(1)  # plotly finishes drawing


def test_load_drag_budget_and_chat(page):
    try:
        _steps(page)
    except Exception:
        page.shot("failure")  # what the page looked like when it went wrong
        raise


def _steps(page):
    _wait_plots(page)
    page.shot("01-loaded")
    assert page.locator("#curve .js-plotly-plot").count() == 1
    before = _wait_change(lambda: _size_cell(page), "")
    marker = _curve_marker(page)

    slider = page.locator("#size-slider input[type=range]")
    box = slider.bounding_box()
    page.mouse.click(box["x"] + 0.3 * box["width"], box["y"] + box["height"] / 2)  # fires .release
    after = _wait_change(lambda: _size_cell(page), before)
    assert 0.2 < float(after) < 0.4
    _wait_change(lambda: _curve_marker(page), marker)  # the plot moved its marker
    _wait_plots(page)
    page.shot("02-size-0.3")

    budget = page.locator("#budget input")
    params = page.locator("#summary [data-testid=cell-1-1]").inner_text()  # "N of FULL (x %)"
    full = re.search(r"of ([\d.,]+)( M)?", params)
    full_gb = float(full.group(1).replace(",", "")) * (1e6 if full.group(2) else 1) * 4 / 1e9
    budget.fill(f"{full_gb * 1.001:.6f}")
    budget.press("Enter")
    page.get_by_text(re.compile("GB left")).wait_for(timeout=60_000)
    assert float(_wait_change(lambda: _size_cell(page), after)) > 0.99  # the slider moved to what fits
    page.shot("03-budget")

    page.get_by_role("tab", name="Chat").click()
    max_new = page.locator("#max-new input[type=number]")
    max_new.fill("24")  # short replies: this runs on a CPU
    max_new.press("Enter")
    box = page.locator("#chat-input textarea")
    box.fill("What is Debian?")
    box.press("Enter")
    speed = page.locator("#speed")
    deadline = time.time() + 300
    while time.time() < deadline and speed.inner_text().count("done") < 2:
        time.sleep(0.3)  # both replies streamed to the end
    assert re.search(r"A size .*tok/s.*done", speed.inner_text()), speed.inner_text()
    assert re.search(r"B size 1.000 .*tok/s.*done", speed.inner_text()), speed.inner_text()
    for pane in ("#chat-a", "#chat-b"):
        bot = page.locator(f"{pane} .message.bot, {pane} [data-testid=bot]").last
        assert bot.inner_text().strip(), f"the reply in {pane} is empty"
    page.shot("04-chat")


def test_measure_export_and_score_tabs(page):
    try:
        page.get_by_role("tab", name="Measure").click()
        windows = page.locator("#windows input[type=number]")
        windows.fill("2")
        windows.press("Enter")
        page.locator("#run-ppl").click()
        page.locator("#measure-text").get_by_text(re.compile("Added to the curve")).wait_for(timeout=180_000)
        page.shot("05-measure")
        page.get_by_role("tab", name="Explore").click()
        page.locator("#curve .legend").get_by_text(re.compile("measured")).first.wait_for(timeout=60_000)
        page.shot("06-measured-point")
        page.get_by_role("tab", name="Export").click()
        page.get_by_role("button", name="Export", exact=True).click()
        page.locator("#export-text").get_by_text(re.compile("Exported size")).wait_for(timeout=300_000)
        page.shot("07-export")
        page.get_by_role("tab", name="Score").click()
        page.get_by_text("Start a new scoring run").wait_for(timeout=10_000)
        time.sleep(4)  # one timer tick fills the runs table and the plot
        page.shot("08-score")
    except Exception:
        page.shot("failure-tabs")
        raise

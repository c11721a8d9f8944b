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
    from acip_core.serving.studio import StudioConfig

    artifact = os.environ.get("ACIP_BROWSER_ARTIFACT") or str(request.getfixturevalue("tiny_artifact"))
    tmp = tmp_path_factory.mktemp("browser")
    demo = app.build_demo(StudioConfig(default_artifact=artifact, precomputed=tmp / "precomputed",
                                       runs=tmp / "runs", artifact_dirs=[artifact]))
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                    **app.launch_options())
    yield url, Path(artifact).name
    demo.close()


@pytest.fixture(scope="module")
def browser(app_url):
    from playwright.sync_api import sync_playwright

    OUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(app_url, browser):
    url, name = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.shot = lambda step: page.screenshot(path=OUT / f"{name}-{step}.png", full_page=True)
    page.get_by_text(re.compile(r"Ready\.")).wait_for(timeout=600_000)
    return page


def _size_cell(page) -> str:
    return page.locator("#summary [data-testid=cell-0-1]").inner_text().strip()  # row 0: size ratio


def _badge(page) -> str:
    """The size in the "Selected size" badge (3 decimals)."""
    found = re.search(r"Selected size (\d\.\d+)", page.locator("#size-badge").inner_text())
    return found.group(1) if found else ""


def _wait_change(read, before, timeout=180):
    """The first new, non-empty value of read() (a table cell is blank while it re-renders)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = read()
        if now and now != before:
            return now
        time.sleep(0.2)
    raise AssertionError(f"still {before!r} after {timeout} s")


def _settled(page, timeout=60):
    """Waits until the badge and the summary name the same size; returns it (3 decimals)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        badge, cell = _badge(page), _size_cell(page)
        if badge and cell and f"{float(cell):.3f}" == badge:
            time.sleep(0.5)
            if _badge(page) == badge:
                return badge
        time.sleep(0.2)
    raise AssertionError(f"badge {_badge(page)!r} and summary {_size_cell(page)!r} disagree")


def _curve_marker(page) -> str:
    """The current-size line of the curve (a plotly shape): its path moves with the size."""
    return page.locator("#curve .shapelayer path").evaluate_all("els => els.map(e => e.getAttribute('d')).join('|')")


def _wait_plots(page):
    for plot in ("#curve", "#heatmap"):
        page.locator(f"{plot} .main-svg").first.wait_for(timeout=180_000)  # slow on a loaded machine
    time.sleep(1)  # plotly finishes drawing


def test_a_newcomers_path(page):
    """load -> keyboard-move the slider -> typed value -> chat -> an error -> measure -> budget ->
    sweep -> export; every size shown equals the size used."""
    try:
        _path(page)
    except Exception:
        page.shot("failure")  # what the page looked like when it went wrong
        raise


def _path(page):
    _wait_plots(page)
    page.shot("01-loaded")
    assert page.locator("#curve .js-plotly-plot").count() == 1
    first = _settled(page)
    marker = _curve_marker(page)

    # keyboard: arrows and PageDown fire no release event; the views must follow anyway
    slider = page.locator("#size-slider input[type=range]")
    slider.focus()
    for key in ["PageDown", "ArrowLeft", "ArrowLeft"]:
        slider.press(key)
    size = _wait_change(lambda: _badge(page), first)
    size = _settled(page)
    assert size != first
    _wait_change(lambda: _curve_marker(page), marker)  # the plot moved its marker too
    typed = page.locator("#size-slider input[type=number]")
    typed.fill("0.55")
    typed.press("Enter")  # applies at once, no blur needed
    size = _wait_change(lambda: _badge(page), size)
    size = _settled(page)
    assert abs(float(size) - 0.55) < 0.01, size
    _wait_plots(page)
    page.shot("02-size-typed")

    # chat: A runs at the selected size
    page.get_by_role("tab", name="Chat").click()
    max_new = page.locator("#max-new input[type=number]")
    max_new.fill("16")  # short replies: this runs on a CPU
    max_new.press("Enter")
    box = page.locator("#chat-input textarea")
    box.fill("What is Debian?")
    box.press("Enter")
    speed = page.locator("#speed")
    deadline = time.time() + 300
    while time.time() < deadline and speed.inner_text().count("done") < 2:
        time.sleep(0.3)  # both replies streamed to the end
    assert re.search(rf"A size {size} .*tok/s.*done", speed.inner_text()), (size, speed.inner_text())
    assert re.search(r"B size 1.000 .*tok/s.*done", speed.inner_text()), speed.inner_text()
    for pane in ("#chat-a", "#chat-b"):
        bot = page.locator(f"{pane} .message.bot, {pane} [data-testid=bot]").last
        assert bot.inner_text().strip(), f"the reply in {pane} is empty"
    page.shot("03-chat")

    # an error is a message; the conversation and the controls stay
    box.fill("   ")
    box.press("Enter")
    page.get_by_text(re.compile("the prompt is empty")).first.wait_for(timeout=30_000)
    assert page.locator("#chat-a").is_visible() and page.locator("#chat-input textarea").is_visible()
    assert page.locator("#chat-a").get_by_text("What is Debian?").count() >= 1
    assert not page.get_by_text(re.compile(r"^Error$")).count(), "an error overlay covers an output"
    page.shot("04-error-leaves-the-page-usable")

    # measure: the row is at the selected size
    page.get_by_role("tab", name="Measure").click()
    windows = page.locator("#windows input[type=number]")
    windows.fill("2")
    windows.press("Enter")
    page.locator("#run-ppl").click()
    measured = page.locator("#measure-text").get_by_text(re.compile("Added to the curve"))
    measured.wait_for(timeout=180_000)
    assert f"at size {size} " in page.locator("#measure-text").inner_text()
    assert "±" in page.locator("#measure-text").inner_text()
    page.shot("05-measure")
    page.get_by_role("tab", name="Explore").click()
    page.locator("#curve .legend").get_by_text(re.compile("measured")).first.wait_for(timeout=60_000)

    # budget: the answer for every dtype; the slider, the badge and the summary move together
    budget = page.locator("#budget input")
    budget.fill("1")  # far more than the tiny model needs: everything fits at 1.0
    budget.press("Enter")
    page.locator("#budget-text").get_by_text(re.compile("best")).first.wait_for(timeout=60_000)
    assert page.locator("#budget-text table").count() == 1
    size = _wait_change(lambda: _badge(page), size)
    size = _settled(page)
    # the slider went to the size the answer names best (the original unless a smaller size measured
    # better beyond noise: README "Budget"), never to another
    best = re.search(r"slider moved to the best: size ([0-9.]+)", page.locator("#budget-text").inner_text())
    assert best and size == best.group(1)
    page.shot("06-budget")
    slider.focus()
    slider.press("PageDown")
    size = _settled(page) if _wait_change(lambda: _badge(page), size) else size
    deadline = time.time() + 30
    while time.time() < deadline and page.locator("#budget input").input_value() == "1":
        time.sleep(0.2)
    need = float(page.locator("#budget input").input_value())
    assert 0 < need < 1, need  # the box follows the selected size: no stale budget

    # sweep: one prompt, many sizes, one after another
    page.get_by_role("tab", name="Sweep").click()
    page.locator("#sweep-sizes textarea, #sweep-sizes input").first.fill("1.0:0.4:0.3")
    new = page.locator("#sweep-new input[type=number]")
    new.fill("12")
    new.press("Enter")
    page.locator("#run-sweep").click()
    grid = page.locator("#sweep-grid")
    last_speed = page.locator("#sweep-grid [data-testid=cell-2-3]")  # the third size's tok/s
    deadline = time.time() + 300
    while time.time() < deadline and not (last_speed.count() and last_speed.inner_text().strip()):
        time.sleep(0.3)
    for ratio in ("1.000", "0.7", "0.4"):
        assert ratio in grid.inner_text(), grid.inner_text()
    page.shot("07-sweep")

    # export: the size exported is the size shown
    page.get_by_role("tab", name="Export").click()
    page.get_by_role("button", name="Export", exact=True).click()
    page.locator("#export-text").get_by_text(re.compile("Exported size")).wait_for(timeout=300_000)
    assert f"Exported size **{size}**" in page.locator("#export-text").inner_html().replace("<strong>", "**") \
        .replace("</strong>", "**") or f"Exported size {size}" in page.locator("#export-text").inner_text()
    page.shot("08-export")
    page.get_by_role("tab", name="Score").click()
    page.get_by_text("Start a new scoring run").wait_for(timeout=10_000)
    # the plan of what the form holds, as soon as the tab opens (it waited for a field to change)
    page.locator("#score-plan").get_by_text(re.compile("Memory plan")).wait_for(timeout=60_000)
    time.sleep(4)  # one timer tick fills the runs table and the plot
    page.shot("09-score")


def test_fine_tune_this_size_says_why_where_there_is_nothing_to_tune(page):
    """Explore's "fine-tune this size" at 0.995 of the tiny artifact, where every layer still runs its
    original weight (a rank-2 LoRA on 32-wide layers: a layer is smaller factorized only after losing
    more of its rank than 0.5 % of the size allows): the button answers with the reason at once and
    starts no run (it used to start one that failed a second later). The run itself, from the same
    handler, is tested in tests/test_finetune.py."""
    if os.environ.get("ACIP_BROWSER_ARTIFACT"):
        pytest.skip("a property of the tiny artifact")
    page.get_by_role("tab", name="Explore").click()
    page.locator("#finetune").get_by_text("Recover this size").click()  # opens the accordion
    typed = page.locator("#size-slider input[type=number]")
    typed.fill("0.995")
    typed.press("Enter")
    _settled(page)
    page.locator("#ft-start").click()
    page.get_by_text(re.compile("nothing to fine-tune")).first.wait_for(timeout=60_000)
    assert page.locator("#size-slider").is_visible()  # a message, the controls stay
    page.shot("10-finetune-refused")
    page.get_by_role("tab", name="Score").click()
    time.sleep(4)  # one timer tick fills the runs table
    assert "ft-" not in page.locator("#runs-table").inner_text()


def test_a_second_visitor_sees_none_of_the_first_ones_measurements(app_url, browser, page):
    url, name = app_url
    other = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        other.goto(url)
        other.get_by_text(re.compile(r"Ready\.")).wait_for(timeout=120_000)
        _wait_plots(other)
        assert other.locator("#curve .legend").get_by_text(re.compile("measured")).count() == 0
    finally:
        other.close()


def test_cancel_drops_a_measurement_still_waiting_for_the_heavy_slot(app_url, browser, monkeypatch):
    """Heavy jobs run one at a time: a visitor's Cancel while theirs waited behind another one was
    cleared when it started, so it ran in full. The page's cancels now drop it from the queue."""
    from acip_core.evaluation.evaluate import Cancelled
    from acip_core.serving.measure import MeasureMixin

    real, started = MeasureMixin.measure_perplexity, []

    def slow(self, ratio, *args, should_stop=None, **kwargs):  # holds the heavy slot for ~5 s
        started.append(ratio)
        for _ in range(50):
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled")
            time.sleep(0.1)
        return real(self, ratio, *args, should_stop=should_stop, **kwargs)

    monkeypatch.setattr(MeasureMixin, "measure_perplexity", slow)
    url, _ = app_url
    first, second = (browser.new_page(viewport={"width": 1400, "height": 1000}) for _ in range(2))
    try:
        for visitor in (first, second):
            visitor.goto(url)
            visitor.get_by_text(re.compile(r"Ready\.")).wait_for(timeout=120_000)
            visitor.get_by_role("tab", name="Measure").click()
        first.locator("#run-ppl").click()
        _wait_change(lambda: len(started), 0, timeout=30)
        second.locator("#run-ppl").click()  # queued behind the first visitor's
        time.sleep(1)
        second.get_by_role("button", name="Cancel", exact=True).click()
        second.locator("#measure-text").get_by_text("Cancelling…").wait_for(timeout=10_000)
        first.locator("#measure-text").get_by_text(re.compile("Added to the curve")).wait_for(timeout=180_000)
        # at its turn the waiting one answers without running
        second.locator("#measure-text").get_by_text("Measurement cancelled.").wait_for(timeout=30_000)
        assert len(started) == 1, "the cancelled measurement ran"
        assert not second.get_by_text(re.compile(r"^Error$")).count(), "an error overlay covers an output"
    finally:
        first.close()
        second.close()


def test_the_gb_view_shows_the_frontier_and_a_budget_fits_an_int4_size(browser, tiny_llama, tmp_path):
    """Precision as the second axis, as a person sees it: on an artifact whose curve has float32 and
    int4 rows, the GB view draws both lines and the frontier, and a budget that only int4 meets
    moves the format selector to int4 (and the slider to the size it fits)."""
    import app
    from acip_core.artifacts.artifact import load_artifact, write_curve
    from acip_core.evaluation.baselines import method_curve
    from acip_core.sources.data import load_text, token_windows
    from acip_core.artifacts.open import open_artifact
    from acip_core.serving.studio import StudioConfig

    from helpers import score_tiny

    # a rank-32 LoRA: every layer of the 32-wide model runs dense, so its int4 sizes (whole groups of
    # 32) are the smallest models and a budget below every bf16 size still fits an int4 one
    folder = score_tiny(tiny_llama, tmp_path / "tiny-formats", eval_windows=0, lora_rank=32, lora_alpha=16.0)
    model = open_artifact(folder)
    evals = {"heldout": token_windows(model.tokenizer, load_text("corpus:heldout"), 32, 4)}
    frames = [method_curve(folder, "acip", evals, [0.4, 0.7, 1.0], fmt) for fmt in ("float32", "int4-g32")]
    import pandas as pd
    write_curve(folder, pd.concat(frames, ignore_index=True))
    assert set(load_artifact(folder).curve.format) == {"float32", "int4-g32"}
    budget_gb = model.full_size("int4-g32").gigabytes * 1.001
    assert budget_gb < model.size_at(0, "bfloat16").gigabytes  # only an int4 size fits

    demo = app.build_demo(StudioConfig(default_artifact=str(folder), precomputed=tmp_path / "precomputed",
                                       runs=tmp_path / "runs", artifact_dirs=[str(folder)],
                                       downloads=tmp_path / "downloads"))
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                    **app.launch_options())
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.get_by_text(re.compile(r"Ready\.")).wait_for(timeout=300_000)
        _wait_plots(page)
        page.get_by_role("radio", name="GB").check()
        legend = page.locator("#curve .legend")
        legend.get_by_text("best for each budget (frontier)").wait_for(timeout=60_000)
        assert legend.get_by_text("acip int4-g32").count() and legend.get_by_text("acip float32").count()
        budget = page.locator("#budget input")
        budget.fill(f"{budget_gb:.9f}")
        budget.press("Enter")
        page.locator("#budget-text").get_by_text(re.compile("best")).first.wait_for(timeout=60_000)
        deadline = time.time() + 60
        while time.time() < deadline and page.locator("#format input").input_value() != "int4-g32":
            time.sleep(0.2)
        assert page.locator("#format input").input_value() == "int4-g32"
        deadline = time.time() + 60  # the summary follows the format
        while time.time() < deadline and "weights in int4-g32" not in page.locator("#summary").inner_text():
            time.sleep(0.2)
        assert "weights in int4-g32" in page.locator("#summary").inner_text()
        page.screenshot(path=OUT / "formats-gb-view-int4-budget.png", full_page=True)
    finally:
        page.close()
        demo.close()

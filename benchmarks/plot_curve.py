"""Renders the artifact's curve (one PNG per eval set) with plotly in headless Chromium.

    .venv/bin/python benchmarks/plot_curve.py [--artifact precomputed/smollm2-135m-instruct]
Writes benchmarks/curve_<evalset>.png (needs Debian's chromium: apt-get install chromium).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from acip_core.artifact import load_artifact  # noqa: E402
from acip_core.plots import curve_figure, ppl_columns  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TITLES = {"ppl_heldout": "held-out handbook text (in-domain)", "ppl_domain": "Python help topics (a held-out domain)"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", default="precomputed/smollm2-135m-instruct")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    curve = load_artifact(args.artifact).curve
    here = os.path.dirname(os.path.abspath(__file__))
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 480})
        for metric in ppl_columns(curve):
            fig = curve_figure(curve, metric=metric, title=f"SmolLM2-135M-Instruct: perplexity on "
                                                           f"{TITLES.get(metric, metric)}")
            html = os.path.join(tmp, f"{metric}.html")
            fig.write_html(html, include_plotlyjs=True, full_html=True)
            page.goto(f"file://{html}")
            page.wait_for_timeout(1500)
            out = os.path.join(here, f"curve_{metric[4:]}.png")
            page.screenshot(path=out, full_page=True)
            print(out)
        browser.close()


if __name__ == "__main__":
    main()

"""Renders the artifact's curve (one PNG per eval set) with plotly in headless Chromium.

    .venv/bin/python benchmarks/plot_curve.py [--artifact precomputed/smollm2-135m-instruct]
Writes benchmarks/curve_<evalset>.png (size-ratio view) and benchmarks/curve_gb_<evalset>.png (GB view:
ACIP in every format, the original in each format, the frontier); needs Debian's chromium.
"""

import argparse
import os
import tempfile

import common  # noqa: E402,F401  (the repository on sys.path, the shared options)

from acip_core.artifacts.artifact import load_artifact  # noqa: E402
from acip_core.evaluation.plots import curve_figure, ppl_columns  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TITLES = {"ppl_heldout": "held-out handbook text (in-domain)", "ppl_domain": "Python help topics (a held-out domain)"}


def main():
    parser = argparse.ArgumentParser()
    common.add_artifact(parser)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    curve = load_artifact(args.artifact).curve
    here = os.path.dirname(os.path.abspath(__file__))
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 480})
        for metric in ppl_columns(curve):
            for x, prefix in (("size_ratio", "curve_"), ("gb", "curve_gb_")):
                fig = curve_figure(curve, x=x, format="bfloat16", metric=metric,
                                   title=f"SmolLM2-135M-Instruct: perplexity on {TITLES.get(metric, metric)}")
                html = os.path.join(tmp, f"{metric}.html")
                fig.write_html(html, include_plotlyjs=True, full_html=True)
                page.goto(f"file://{html}")
                page.wait_for_timeout(1500)
                out = os.path.join(here, f"{prefix}{metric[4:]}.png")
                page.screenshot(path=out, full_page=True)
                print(out)
        browser.close()


if __name__ == "__main__":
    main()

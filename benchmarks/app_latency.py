"""Latency of the running app, measured from outside through gradio_client (prints one JSON object).

    python benchmarks/app_latency.py [ARTIFACT] [--port 7861] [--chat-tokens 64]

Starts `python app.py` (as `make run` does) with ACIP_ARTIFACT=ARTIFACT on a free port and reports:
- cold_start_s: process start -> the page's /start call answered (model loaded, views filled)
- warm_start_s: a second, fresh session's /start (the model is already in memory)
- size_release_s: median time of /size (summary, layer table, heatmap, curve) for random ratios
- chat at 1.0 and 0.5: first-token latency and decode tokens/s as the server measured them,
  plus the client-side time to the first streamed text.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG = Path(os.environ.get("TMPDIR", "/tmp")) / "app_latency.log"
import common  # noqa: E402  (the repository on sys.path, the shared options)
from acip_core.serving.chat import message_text  # noqa: E402
from load_test import listed_artifact  # noqa: E402  (this script's folder is on sys.path)


def wait_for_server(url: str, proc, timeout: float = 600) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def _messages(history) -> list:
    """A Chatbot's value as gradio_client returns it: the messages, or an update holding them."""
    return history.get("value", []) if isinstance(history, dict) else list(history)


def chat_numbers(client, artifact: str, ratio: float, tokens: int, dtype: str) -> dict:
    start = time.perf_counter()
    job = client.submit(artifact, ratio, artifact, 1.0, False, "Explain what a package manager does.", [], [],
                        tokens, 1.15, dtype, api_name="/chat")
    first_text = None
    for hist_a, _, _, _ in job:
        msgs = _messages(hist_a)
        if first_text is None and msgs and message_text(msgs[-1]["content"]).strip():
            first_text = time.perf_counter() - start
    hist_a, _, speed, _ = job.result()
    hist_a = _messages(hist_a)
    first = re.search(r"first token ([\d.]+) s", speed)
    rate = re.search(r"([\d.]+) tok/s", speed)
    count = re.search(r"(\d+) tokens", speed)
    return dict(size_ratio=ratio, dtype=dtype, first_token_s=float(first.group(1)) if first else None,
                tokens_per_s=float(rate.group(1)) if rate else None, tokens=int(count.group(1)) if count else None,
                client_first_text_s=first_text, total_s=time.perf_counter() - start,
                text=message_text(hist_a[-1]["content"])[:160])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default=common.ARTIFACT)
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--chat-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    common.add_json(parser)
    args = parser.parse_args()
    from gradio_client import Client

    env = dict(os.environ, ACIP_ARTIFACT=args.artifact, GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_SERVER_PORT=str(args.port))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,  # what `make run` starts
                            stdout=open(LOG, "w"), stderr=subprocess.STDOUT)  # the app's log, kept
    try:
        url = f"http://127.0.0.1:{args.port}/"
        wait_for_server(url, proc)
        server_up = time.perf_counter() - start
        client = Client(url, verbose=False)
        first = client.predict(api_name="/start")
        cold = time.perf_counter() - start
        artifact = listed_artifact(first)
        metric = first[3].get("value") if isinstance(first[3], dict) else first[3]  # the evaluation set
        t = time.perf_counter()
        Client(url, verbose=False).predict(api_name="/start")
        warm = time.perf_counter() - t
        rng, times = random.Random(0), []
        for _ in range(10):
            t = time.perf_counter()
            client.predict(artifact, round(rng.uniform(0.3, 1.0), 3), "size ratio", args.dtype, metric,
                           api_name="/size")
            times.append(time.perf_counter() - t)
        chats = [chat_numbers(client, artifact, r, args.chat_tokens, args.dtype) for r in (1.0, 0.5)]
        result = dict(artifact=args.artifact, server_up_s=round(server_up, 2), cold_start_s=round(cold, 2),
                      warm_start_s=round(warm, 2), size_release_median_s=round(statistics.median(times), 3),
                      size_release_max_s=round(max(times), 3), chat=chats)
        print(json.dumps(result, indent=1))
        if args.json is not None:
            common.write_result("app_latency", result, args.json or None)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()

"""How much the server writes to its log for a malformed chat history (issue 28: a 0.68 MB one grew
the log by 3.47 MB): the app in public mode, in this process, its stdout/stderr and logging captured.

    .venv/bin/python benchmarks/malformed_history_log.py [--artifact DIR] [--messages 3000]

Sends /chat twice with a history of `messages` messages whose content blocks are of no known type
(100 characters each), then prints the payload's bytes and the bytes the server wrote while
answering (stderr, stdout and the acip_studio logger at INFO). The artifact is not loaded: Gradio
refuses the history before the handler runs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import common  # noqa: E402,F401  (the repository on sys.path, the shared options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_artifact(parser)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--gradio-chatbot", action="store_true",
                        help="the panes as plain gr.Chatbot (Gradio's own refusal: the figure before the fix)")
    args = parser.parse_args()
    os.environ["ACIP_PUBLIC"] = "1"
    import gradio as gr

    import app

    if args.gradio_chatbot:
        app.TextChatbot = gr.Chatbot
    from acip_core.serving.studio import StudioConfig
    from gradio_client import Client

    tmp = tempfile.mkdtemp()
    demo = app.build_demo(StudioConfig(default_artifact=args.artifact, runs=tmp + "/runs",
                                       precomputed=tmp + "/pre", downloads=tmp + "/dl"))
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                    **app.launch_options())
    name = demo.handlers.app.name_of(str(Path(args.artifact)))
    bad = [dict(role="user", content=[dict(type="nonsense", foo="z" * 100)]) for _ in range(args.messages)]
    payload = len(json.dumps(bad))
    out, err, logged = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logged)
    logging.getLogger("acip_studio").addHandler(handler)
    logging.getLogger("acip_studio").setLevel(logging.INFO)
    client = Client(url, verbose=False)
    answers = []
    with redirect_stdout(out), redirect_stderr(err):
        for _ in range(2):
            try:
                client.predict(name, 1.0, name, 1.0, False, "hi", bad, [], 4, 1.15, "float32", api_name="/chat")
            except Exception as refusal:  # the expected answer
                answers.append(str(refusal)[:120])
    demo.close()
    written = len(out.getvalue()) + len(err.getvalue()) + len(logged.getvalue())
    print(json.dumps(dict(payload_bytes=payload, requests=2, server_bytes_written=written,
                          log_lines=logged.getvalue().strip().splitlines(), answers=answers), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

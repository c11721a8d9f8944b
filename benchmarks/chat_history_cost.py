"""What a chat history can cost the server at most (issue 28): the public bounds (Limits.chat_messages
messages, counted before templating; Limits.chat_tokens tokens after the chat template) against
the worst histories a visitor may send.

    ACIP_PUBLIC=1 .venv/bin/python benchmarks/chat_history_cost.py [--artifact DIR] [--json out.json]

For each history: the time to refuse or to build the prompt (Explorer._chat_ids: templatings
counted), the prompt's tokens, and the time to the first token of the reply (the prefill of that
prompt at size 1.0, float32, max_new_tokens 1): what one such request holds a core for before it
streams. Histories: 12,000 one-character messages (refused), the allowed count of one-character
messages, the allowed count sharing the 200,000-character cap, and 25 messages of 8,000 characters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import common  # noqa: E402,F401  (the repository on sys.path, the shared options)


def main() -> int:
    os.environ.setdefault("ACIP_PUBLIC", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_artifact(parser)
    parser.add_argument("--json")
    parser.add_argument("--prompt-only", metavar="MODEL_DIR",
                        help="only build the prompts, with this model folder's tokenizer and config (no "
                             "model load, no first token): the templating cost alone")
    args = parser.parse_args()
    from acip_core.serving.chat import MAX_HISTORY_CHARS
    from acip_core.serving.explorer import Explorer
    from acip_core.serving.public import limits

    lim = limits()
    if args.prompt_only:
        from types import SimpleNamespace

        from transformers import AutoConfig, AutoTokenizer

        ex = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(args.prompt_only),
                             any_size=SimpleNamespace(base=SimpleNamespace(config=AutoConfig.from_pretrained(args.prompt_only))))
        ex._chat_ids = lambda *a: Explorer._chat_ids(ex, *a)
    else:
        ex = Explorer.open(args.artifact)
        ex.model(1.0)
    calls = []
    template = type(ex.tokenizer).apply_chat_template

    def counting(self, *a, **k):
        calls.append(1)
        return template(self, *a, **k)

    type(ex.tokenizer).apply_chat_template = counting

    def turns(n, chars):
        return [dict(role="user" if i % 2 == 0 else "assistant", content=("word " * chars)[:chars]) for i in range(n)]

    cases = {"12000 x 1 char": turns(12_000, 1), f"{lim.chat_messages} x 1 char": turns(lim.chat_messages, 1),
             f"{lim.chat_messages} x {MAX_HISTORY_CHARS // lim.chat_messages} chars":
                 turns(lim.chat_messages, MAX_HISTORY_CHARS // lim.chat_messages),
             "25 x 8000 chars": turns(25, 8000)}
    rows = []
    for name, history in cases.items():
        del calls[:]
        start = time.perf_counter()
        try:
            ids, truncated = ex._chat_ids(history, "What is Debian?", 1)
        except ValueError as err:
            rows.append(dict(history=name, refused=str(err)[:80], seconds=round(time.perf_counter() - start, 4)))
            print(rows[-1], flush=True)
            continue
        prompt_s = time.perf_counter() - start
        if args.prompt_only:
            rows.append(dict(history=name, templatings=len(calls), prompt_tokens=int(ids.shape[1]),
                             truncated=truncated, prompt_s=round(prompt_s, 3)))
            print(rows[-1], flush=True)
            continue
        start = time.perf_counter()
        snap = None
        for snap in ex.stream_chat(1.0, history, "What is Debian?", 1, 1.0):
            pass
        rows.append(dict(history=name, templatings=len(calls), prompt_tokens=int(ids.shape[1]), truncated=truncated,
                         prompt_s=round(prompt_s, 3), first_token_s=round(snap["first_token_s"], 3),
                         request_s=round(time.perf_counter() - start, 3)))
        print(rows[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, chat_messages=lim.chat_messages,
                                                   chat_tokens=lim.chat_tokens), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Public mode's limits: how much work and disk every layer may use (README "Public deployment").

The app is public when SPACE_ID is set (Hugging Face sets it on every Space) or ACIP_PUBLIC=1
(ACIP_PUBLIC=0 forces local mode). Every limit is a field of Limits and can be set with
ACIP_LIMIT_<FIELD> (e.g. ACIP_LIMIT_MAX_STEPS=500); local use keeps the same fields, wider.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

GB, MB = 10**9, 10**6


def is_public(env=None) -> bool:
    """True on a Space (SPACE_ID set) or with ACIP_PUBLIC=1; ACIP_PUBLIC=0 forces local mode."""
    env = os.environ if env is None else env
    flag = env.get("ACIP_PUBLIC", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    return flag in ("1", "true", "yes", "on") or bool(env.get("SPACE_ID"))


@dataclass(frozen=True)
class Limits:
    """Every bound on a visitor's work. Sizes in bytes, times in seconds."""

    public: bool
    scoring: str  # "open" (local), "token" (public, ACIP_ADMIN_TOKEN set) or "off"
    max_steps: int  # ACIP steps of one scoring run
    max_batch_size: int
    max_seq_len: int
    max_run_seconds: float  # wall time of one scoring run; then it is stopped (resumable)
    max_running: int  # scoring runs at once, in total
    lm_eval_items: int  # items per task of one lm-eval measurement
    lm_eval_batch: int  # requests per forward: lm-eval holds batch × length × vocab log-probs at once
    perplexity_windows: int
    upload_bytes: int  # one uploaded file (Gradio's max_file_size too)
    uploads_bytes: int  # all kept calibration uploads
    runs_bytes: float  # the runs folder; oldest stopped/finished runs are removed first
    exports_bytes: int  # the exports folder; oldest exports are removed first
    bases_bytes: int  # the cached bases; least recently used removed first
    chat_tokens: int  # history + message of one chat request, after the chat template
    chat_messages: int  # messages of one chat history (counted before any templating)
    cache_seconds: int  # Gradio's cache (uploads, downloads) is cleaned of files older than this
    heavy_per_hour: float  # measurements, sweeps and exports one visitor (session, and IP) may start per hour
    visitor_upload_bytes: float  # what one client IP may upload per hour (all files)
    total_upload_bytes: float  # what all visitors together may upload per hour


def _local() -> Limits:
    return Limits(public=False, scoring="open", max_steps=100_000, max_batch_size=256, max_seq_len=32_768,
                  max_run_seconds=math.inf, max_running=1, lm_eval_items=100_000, lm_eval_batch=512,
                  perplexity_windows=1024, upload_bytes=200 * MB, uploads_bytes=2 * GB, runs_bytes=math.inf,
                  exports_bytes=20 * GB, bases_bytes=20 * GB, chat_tokens=4096, chat_messages=2000,
                  cache_seconds=24 * 3600, heavy_per_hour=math.inf, visitor_upload_bytes=math.inf,
                  total_upload_bytes=math.inf)


def _public(env) -> Limits:
    # steps/batch/sequence: a run of the embedded model stays under ~3 GB of memory and 30 min on a
    # 2-core Space (README, "Public deployment"); bases are ~0.6 GB each for SmolLM2. lm-eval's batch of
    # 16 held +0.97 GiB on SmolLM2, ~32 MiB a request (benchmarks/RESULTS.md, "lm-eval's batch")
    return Limits(public=True, scoring="token" if env.get("ACIP_ADMIN_TOKEN") else "off", max_steps=400,
                  max_batch_size=4, max_seq_len=512, max_run_seconds=1800, max_running=1, lm_eval_items=100,
                  lm_eval_batch=16, perplexity_windows=64, upload_bytes=10 * MB, uploads_bytes=100 * MB,
                  runs_bytes=3 * GB, exports_bytes=2 * GB, bases_bytes=3 * GB, chat_tokens=1024,
                  chat_messages=400, cache_seconds=3600, heavy_per_hour=20, visitor_upload_bytes=30 * MB,
                  total_upload_bytes=300 * MB)


def limits(env=None) -> Limits:
    """The limits in force: public or local defaults, each overridable by ACIP_LIMIT_<FIELD>."""
    env = os.environ if env is None else env
    base = _public(env) if is_public(env) else _local()
    changes = {}
    for f in dataclasses.fields(Limits):
        raw = env.get(f"ACIP_LIMIT_{f.name.upper()}")
        if raw is None or f.name in ("public", "scoring"):
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"ACIP_LIMIT_{f.name.upper()}={raw!r} is not a number") from None
        if not value > 0:
            raise ValueError(f"ACIP_LIMIT_{f.name.upper()} must be positive, got {raw!r}")
        changes[f.name] = value if f.type == "float" or math.isinf(value) else int(value)
    return dataclasses.replace(base, **changes)


def describe(lim: Limits | None = None) -> str:
    """What is limited and why, for the page (Markdown)."""
    lim = lim or limits()
    if not lim.public:
        return ""
    scoring = {"off": "**off** (the Space's owner can enable them with the secret `ACIP_ADMIN_TOKEN`)",
               "token": "for the owner only (admin token)"}[lim.scoring]
    return (f"**Public Space.** To keep it usable by everyone, visitors' work is bounded: scoring runs are "
            f"{scoring}, one at a time, at most {lim.max_steps} steps, batch {lim.max_batch_size} × "
            f"{lim.max_seq_len} tokens and {lim.max_run_seconds / 60:.0f} min; lm-eval at most "
            f"{lim.lm_eval_items} items per task, batch {lim.lm_eval_batch}; {lim.heavy_per_hour:g} measurements, sweeps or exports per "
            f"visitor (session and address) per hour; chat history {lim.chat_messages} messages and "
            f"{lim.chat_tokens} tokens; uploads {lim.upload_bytes / MB:g} MB of text per file, "
            f"{lim.visitor_upload_bytes / MB:g} MB per address per hour; models and texts only by name (no server paths); old "
            "exports and runs are removed first when the disk bound is reached. Run it locally for no limits.")

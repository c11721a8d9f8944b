"""Public mode: what a stranger may do when the app runs as a public Space (README "Public deployment").

A visitor is a stranger: nothing they send is a server path, work is bounded (the Limits of
system/limits.py, presented here with the rest of the policy), scoring runs need the owner's
ACIP_ADMIN_TOKEN. Local use keeps every feature; the bounds that hold everywhere (chat history
tokens, the basis cache, upload size) are only wider there.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from acip_core.sources.data import DATA_CHOICES, check_data, uploads_dir  # noqa: F401 (the policy's one face)
from acip_core.sources.models import EMBEDDED
from acip_core.system.disk import evict_oldest, remove_leftovers, remove_stale
from acip_core.system.limits import GB, MB, Limits, describe, is_public, limits  # noqa: F401 (the policy's one face)

_REPO = Path(__file__).resolve().parents[2]
ADMIN = "admin"  # the owner id of the token holder: may control every run
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def client_ip(request, env=None) -> str | None:
    """The visitor's IP address from a gr.Request (or anything with .headers and .client). Behind a
    proxy (a Space: the proxy adds the visitor's address to X-Forwarded-For) the address is the
    ACIP_PROXY_HOPS-th entry from the right of that header (default 1 on a Space, where SPACE_ID is
    set, else 0: the connection's own address). Entries to the left of it are whatever the client
    sent and are never trusted. None when the request carries neither."""
    env = os.environ if env is None else env
    try:
        hops = int(env.get("ACIP_PROXY_HOPS", "1" if env.get("SPACE_ID") else "0"))
    except ValueError:
        raise ValueError(f"ACIP_PROXY_HOPS={env.get('ACIP_PROXY_HOPS')!r} is not a whole number") from None
    headers = getattr(request, "headers", None) or {}
    if hops > 0:
        forwarded = [h.strip() for h in str(headers.get("x-forwarded-for") or "").split(",") if h.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None


def visitor_keys(request, env=None) -> list[str]:
    """The keys a visitor's quotas are counted under: the browser session and the client IP (a new
    session from the same address shares the address's count)."""
    keys = ["session:" + str(getattr(request, "session_hash", None) or "anonymous")]
    ip = client_ip(request, env)
    if ip:
        keys.append("ip:" + ip)
    return keys


class SessionQuota:
    """Heavy jobs (perplexity, lm-eval, sweeps, exports) share one slot for every visitor; in public
    mode each visitor may start at most `per_hour` of them in any hour, so one stranger cannot keep
    the slot (or the queue in front of it) for everyone: a job over the quota is refused at once,
    which frees the slot at once. A visitor is counted under every key of public.visitor_keys (its
    session and its IP): a start counts for each, and any key over the quota refuses. A start that
    is refused afterwards (bad input) is given back (`job`). Thread-safe; keys are forgotten an hour
    after their last job."""

    def __init__(self, per_hour: float, clock=time.monotonic):
        self.per_hour, self.clock = per_hour, clock
        self._starts: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def take(self, keys) -> float | None:
        """Counts one start for every key (a str: one key), or raises ValueError saying when the next one
        is allowed. Returns the start's time (for give_back), None when unlimited."""
        if math.isinf(self.per_hour):
            return None
        keys = [keys or "anonymous"] if isinstance(keys, str) or keys is None else list(keys) or ["anonymous"]
        now = self.clock()
        with self._lock:
            for key in [k for k, v in self._starts.items() if not v or now - v[-1] > 3600]:
                del self._starts[key]
            for key in keys:
                starts = [t for t in self._starts.get(key, []) if now - t < 3600]
                if len(starts) >= self.per_hour:
                    wait = 3600 - (now - starts[0])
                    who = "this address" if key.startswith("ip:") else "this session"
                    raise ValueError(f"{who} has started {len(starts)} measurements/exports in the last "
                                     f"hour, the public limit; the next is possible in {wait / 60:.0f} min "
                                     "(run the app locally for no limits)")
            for key in keys:
                self._starts[key] = [t for t in self._starts.get(key, []) if now - t < 3600] + [now]
        return now

    def give_back(self, keys, started: float | None) -> None:
        """Uncounts a start (`take`'s return value) that did no work: a request refused for its input."""
        if started is None:
            return
        keys = [keys or "anonymous"] if isinstance(keys, str) or keys is None else list(keys) or ["anonymous"]
        with self._lock:
            for key in keys:
                starts = self._starts.get(key, [])
                if started in starts:
                    starts.remove(started)

    @contextmanager
    def job(self, keys, refused=(ValueError, FileNotFoundError)):
        """One heavy job: counted on entry; given back when the body raises one of `refused` (input
        that was refused, so no work was done)."""
        started = self.take(keys)
        try:
            yield
        except refused:
            self.give_back(keys, started)
            raise


class UploadQuota:
    """What anonymous visitors may upload (Gradio's /gradio_api/upload route, before any handler):
    per visitor key (public.visitor_keys: the client IP) at most `per_visitor` bytes and in total
    at most `total` bytes in any hour; a request is counted by its Content-Length before its body is
    read. Gradio keeps uploads for Limits.cache_seconds (an hour in public mode), so these bound the
    upload folder too. Thread-safe."""

    def __init__(self, per_visitor: float, total: float, clock=time.monotonic):
        self.per_visitor, self.total, self.clock = per_visitor, total, clock
        self._sent: list[tuple[float, str, int]] = []  # (time, key, bytes)
        self._lock = threading.Lock()

    def take(self, key: str, nbytes: int) -> None:
        """Counts `nbytes` for `key`, or raises ValueError saying which bound it would pass."""
        now = self.clock()
        with self._lock:
            self._sent = [e for e in self._sent if now - e[0] < 3600]
            mine = sum(b for _, k, b in self._sent if k == key)
            everyone = sum(b for _, _, b in self._sent)
            if mine + nbytes > self.per_visitor:
                raise ValueError(f"uploads from this address reached {self.per_visitor / MB:g} MB in the last "
                                 "hour, the public limit: try again later")
            if everyone + nbytes > self.total:
                raise ValueError(f"uploads to this Space reached {self.total / MB:g} MB in the last hour, "
                                 "the public limit: try again later")
            self._sent.append((now, key, nbytes))


def nul_files(paths) -> list[str]:
    """The files among `paths` that hold a NUL byte (so are not text), read in 1 MB blocks."""
    bad = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                while block := f.read(MB):
                    if b"\0" in block:
                        bad.append(str(path))
                        break
        except OSError:
            continue
    return bad


# -- who may do what ----------------------------------------------------------------------------
def token_ok(token, env=None) -> bool:
    """Whether `token` is the owner's ACIP_ADMIN_TOKEN (constant-time comparison; no token set: False)."""
    env = os.environ if env is None else env
    expected = env.get("ACIP_ADMIN_TOKEN") or ""
    return bool(expected) and isinstance(token, str) and hmac.compare_digest(token.encode(), expected.encode())


def owner(token=None, session: str | None = None, env=None) -> str | None:
    """Who is asking, for run ownership: ADMIN (the token holder), a session's id, or None (local:
    the single user of the machine, who may control every run)."""
    if token_ok(token, env):
        return ADMIN
    if not is_public(env):
        return None
    return "session-" + hashlib.sha256((session or "anonymous").encode()).hexdigest()[:16]


def check_may_score(token=None, env=None) -> None:
    """Raises ValueError (with what to do) when scoring runs may not start: public mode without the token."""
    lim = limits(env)
    if lim.scoring == "off":
        raise ValueError("Training runs (scoring and fine-tuning) are off on this public Space: they take "
                         "the whole machine for up to half an hour. The Space's owner can enable them by "
                         "setting the secret ACIP_ADMIN_TOKEN; run ACIP Studio locally (make run) to score "
                         "or fine-tune any model.")
    if lim.scoring == "token" and not token_ok(token, env):
        raise ValueError("Starting or controlling training runs (scoring, fine-tuning) on this public Space "
                         "needs the owner's "
                         "admin token (ACIP_ADMIN_TOKEN): type it in the admin token field.")


def may_control(run_owner: str | None, who: str | None) -> bool:
    """Whether `who` may cancel, resume or delete a run owned by `run_owner`. `who` None: unrestricted
    (local mode). A run without an owner (started from the command line, or in local mode, in a runs
    folder a public Space also reads) is the admin's alone."""
    if who is None or who == ADMIN:
        return True
    return run_owner is not None and hmac.compare_digest(str(run_owner), str(who))


# -- what a visitor may name --------------------------------------------------------------------
def check_model(source, env=None) -> str:
    """A model field's value: in public mode only the embedded model or a hub id, never a server path.
    (Visitors name models only for scoring runs, so jobs.start checks here; an artifact's own model
    source was written by the server and is loaded as it is.)"""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"give a model: {EMBEDDED!r}, a local directory, a .gguf file or a Hugging Face id")
    source = source.strip()
    if len(source) > 200 or any(ord(c) < 32 for c in source):
        raise ValueError("the model name is too long or holds control characters")
    # a hub id that is also a path here (relative to the working directory, or to the repository,
    # where scoring processes run) would be read from disk by transformers: refused too
    if is_public(env) and source != EMBEDDED and (not _HUB_ID.match(source) or ".." in source
                                                  or os.path.lexists(source) or (_REPO / source).exists()):
        raise ValueError(f"on this public Space a model is {EMBEDDED!r} or a Hugging Face id like "
                         "'HuggingFaceTB/SmolLM2-360M-Instruct'; server paths are not accepted")
    return source


def accept_upload(path, env=None) -> Path:
    """Checks an uploaded calibration file (size, UTF-8 text), keeps one copy under uploads_dir()
    named by its content hash, removes the uploaded temp file, and evicts the oldest uploads beyond
    the bound. Returns the kept file's path."""
    lim = limits(env)
    src = Path(path)
    try:
        size = src.stat().st_size
        if size > lim.upload_bytes:
            raise ValueError(f"the uploaded file is {size / MB:.1f} MB; the limit is {lim.upload_bytes / MB:g} MB")
        data = src.read_bytes()
        if b"\0" in data:
            raise ValueError("the uploaded file is not text (it holds NUL bytes)")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the uploaded file is not UTF-8 text") from None
    finally:
        src.unlink(missing_ok=True)  # used once: never kept in Gradio's cache
    root = uploads_dir()
    root.mkdir(parents=True, exist_ok=True)
    kept = root / f"{hashlib.sha256(data).hexdigest()[:16]}.txt"
    if not kept.is_file():
        tmp = kept.with_suffix(".txt.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, kept)
    os.utime(kept)  # the newest: evicted last
    evict_oldest(root, lim.uploads_bytes, keep=[kept])
    return kept


# -- what is echoed -----------------------------------------------------------------------------
def md_escape(text) -> str:
    """Any string shown in a Markdown component as plain text: no links, images, emphasis or HTML."""
    return _MARKDOWN.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def clean_at_start(exports=None, roots=(), older_than_s: float = 600) -> list[Path]:
    """At app start: what killed processes left behind — `*.tmp` files and folders under `roots`
    (the cache, runs), and exports older than `older_than_s` (a previous app's, or a killed export's
    half-written zip and folder). Younger entries may belong to another live app on this machine."""
    removed = []
    for root in roots:
        removed += remove_leftovers(root, older_than_s)
    if exports is not None:
        removed += remove_stale(exports, older_than_s)
    return removed


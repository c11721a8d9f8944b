"""Load test of the launched app: N concurrent gradio_client users against one `python app.py`.

    python benchmarks/load_test.py --clients 8 --seconds 120 [--artifact DIR] [--json out.json]

1. Starts `python app.py` (ACIP_ARTIFACT=DIR) on a free port and waits until /start answers
   (the artifact is loaded).
2. Lone user: one client, sequentially, records the reference answer of every request the load
   phase can make: the greedy chat reply of each (size, dtype, prompt), the /size view (badge and
   summary) of each size, the /budget answer of each budget, the perplexity at a few sizes. The
   app's RSS is read after each new (size, dtype) was first chatted at: how memory grows with the
   number of materialized sizes, up to the Explorer's cache limit.
3. Load: N threads, each with its own Client (its own session, opened with the page-load /start),
   loop for `seconds` doing a random mix of slider moves (/size), budget queries (/budget, then the
   slider moves to the fitted size), chats (alone or side by side with a second size) and
   perplexity runs. Every answer is compared with the lone user's; the app's RSS is sampled every
   0.5 s.

The report: requests, errors and mismatches per kind, latency p50/p95/max per kind (client side,
queueing included), RSS (after loading, after the lone user, peak under load, the kernel's VmHWM)
and server-side tracebacks found in the app's log. Exit status 1 on any error or mismatch.
The test suite runs a small version (tests/test_load.py) on the tiny artifact.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import common  # the repository on sys.path, the shared options

ROOT = common.ROOT
DEFAULT_ARTIFACT = Path(common.ARTIFACT)
PROMPTS = ("What is the capital of France?", "Write a haiku about autumn.",
           "Give three tips for writing clear emails.")
DEFAULT_RATIOS = (1.0, 0.75, 0.55, 0.4)
MIX = (("size", 0.25), ("budget", 0.15), ("chat", 0.30), ("chat_pair", 0.15), ("perplexity", 0.15))
# --public: the app as a public Space (ACIP_PUBLIC=1) and exports in the mix as well
MIX_PUBLIC = (("size", 0.22), ("budget", 0.13), ("chat", 0.27), ("chat_pair", 0.13), ("perplexity", 0.15),
              ("export", 0.10))
MB = 1 << 20


# -- the app process ----------------------------------------------------------------------------
def listed_artifact(start_output) -> str:
    """The artifact the page load (/start) selected, as the page lists it (a name in public mode,
    never a server path): its dropdown output is a value, or an update whose value may be missing
    (then the first choice, the default)."""
    listed = start_output[0]
    if isinstance(listed, dict):
        listed = listed.get("value") or listed["choices"][0][1]
    return listed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


class AppProcess:
    """`python app.py` on a free port, its output in a log file; a context manager."""

    def __init__(self, artifact: str | Path, runs_dir: str | Path | None = None, start_timeout: float = 900,
                 env: dict | None = None):
        self.artifact, self.start_timeout = str(artifact), start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(tempfile.mkstemp(prefix="acip-load-", suffix=".log")[1])
        self.env = dict(os.environ, ACIP_ARTIFACT=self.artifact, GRADIO_SERVER_PORT=str(self.port),
                        GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False",
                        HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PYTHONUNBUFFERED="1")
        if runs_dir is not None:
            self.env["ACIP_RUNS"] = str(runs_dir)
        self.env.update(env or {})
        self.proc = None

    def __enter__(self) -> "AppProcess":
        self._log = open(self.log_path, "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_http(start + self.start_timeout)
            self.http_up_s = time.perf_counter() - start
            self.session()  # returns once the artifact is loaded
            self.ready_s = time.perf_counter() - start
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_http(self, deadline: float) -> None:
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"app.py did not answer at {self.url}:\n{self.log_tail()}")

    def session(self, address: str | None = None):
        """A new client (its own session) after its page load: /start returns once the artifact is
        loaded, and fills the session's artifact dropdown, whose choices every other endpoint checks.
        `address`: the visitor's IP as a Space's proxy reports it (X-Forwarded-For; the public app
        trusts it with ACIP_PROXY_HOPS=1), so simulated visitors have their own per-address quotas."""
        from gradio_client import Client

        headers = {"X-Forwarded-For": address} if address else None
        client = Client(self.url, verbose=False, download_files=False, analytics_enabled=False, headers=headers)
        self.listed = listed_artifact(client.predict(api_name="/start"))
        return client

    def rss(self) -> tuple[int, int]:
        return rss_bytes(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def tree_bytes(*roots) -> int:
    """Bytes of every file under `roots` (files may vanish while counted)."""
    total = 0
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
    return total


class DiskSampler(threading.Thread):
    """Samples the bytes under `roots` (the app's temp and Gradio cache) every `every` s until stop()."""

    def __init__(self, roots, every: float = 2.0):
        super().__init__(daemon=True, name="disk")
        self.roots, self.every, self.samples = roots, every, []
        self._done = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self._done.is_set():
            self.samples.append((round(time.perf_counter() - start, 2), tree_bytes(*self.roots)))
            self._done.wait(self.every)

    def stop(self) -> list:
        self._done.set()
        self.join(timeout=30)
        return self.samples


class RssSampler(threading.Thread):
    """Samples a process's RSS every `every` seconds until stop()."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True, name="rss")
        self.pid, self.every, self.samples = pid, every, []
        self._done = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self._done.is_set():
            try:
                self.samples.append((round(time.perf_counter() - start, 2), rss_bytes(self.pid)[0]))
            except OSError:
                return
            self._done.wait(self.every)

    def stop(self) -> list:
        self._done.set()
        self.join(timeout=5)
        return self.samples


# -- one request of each kind (what is compared with the lone user) ------------------------------
def _text(content) -> str:
    """The text of a Chatbot message's content (a string or a list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


class Requests:
    """The app's endpoints as the load test calls them; every call returns a comparable value."""

    def __init__(self, artifact: str, max_new_tokens: int, ppl_windows: int, ppl_seq_len: int):
        self.artifact, self.max_new_tokens = artifact, max_new_tokens
        self.ppl_windows, self.ppl_seq_len = ppl_windows, ppl_seq_len

    def size(self, client, ratio: float, dtype: str = "float32"):
        summary, _layers, _heatmap, _curve, badge, _budget, _answer = client.predict(
            self.artifact, ratio, "size ratio", dtype, None, api_name="/size")
        return badge, tuple(tuple(map(str, row)) for row in summary["data"])

    def budget(self, client, gigabytes: float, dtype: str = "float32"):
        ratio, _format, text = client.predict(self.artifact, gigabytes, api_name="/budget")  # best format
        return float(ratio), text

    def chat(self, client, ratio: float, prompt: str, dtype: str = "float32", ratio_b: float | None = None):
        """The final greedy reply at `ratio` (and at `ratio_b` when side by side): (text_a, text_b)."""
        hist_a, hist_b, _speed, _msg = client.predict(
            self.artifact, ratio, self.artifact, 1.0 if ratio_b is None else ratio_b, ratio_b is not None, prompt,
            [], [], self.max_new_tokens, 1.15, dtype, api_name="/chat")
        text_b = _text(hist_b[-1]["content"]) if ratio_b is not None else None
        return _text(hist_a[-1]["content"]), text_b

    def export(self, client, ratio: float, dtype: str = "float32") -> str:
        """The export's size and parameter count as the answer states them (the zip is not fetched)."""
        text, _file = client.predict(self.artifact, ratio, "low-rank: smallest files (loads with trust_remote_code)",
                                     dtype, api_name="/export")
        found = re.search(r"Exported size \*\*([^*]+)\*\* \(([^)]*params[^)]*)\)", text)
        if not found:
            raise RuntimeError(f"unexpected export answer: {text[:200]!r}")
        return f"{found.group(1)} {found.group(2)}"

    def perplexity(self, client, ratio: float, dtype: str = "float32") -> str:
        text, _results, _csv = client.predict(self.artifact, ratio, "corpus:heldout", self.ppl_windows,
                                              self.ppl_seq_len, dtype, api_name="/perplexity")
        found = re.search(r"Perplexity \*\*([^*]+)\*\*", text)
        if not found:
            raise RuntimeError(f"unexpected perplexity answer: {text[:200]!r}")
        return found.group(1)


def _cell(summary_rows, label: str) -> str:
    return dict((row[0], row[1]) for row in summary_rows)[label]


def _params(summary_rows) -> float:
    """The parameter count of a /size summary ("134.5 M of ..." or "12,345 of ...")."""
    number = _cell(summary_rows, "parameters").split(" of ")[0].replace(",", "")
    return float(number[:-2]) * 1e6 if number.endswith(" M") else float(number)


# -- the lone user ------------------------------------------------------------------------------
def lone_user(app: AppProcess, req: Requests, ratios, bf16_ratio, ppl_ratios, prompts, exports=False) -> dict:
    """Reference answers, asked one at a time by a single client."""
    client = app.session()
    ref = dict(size={}, budget={}, chat={}, perplexity={}, export={}, rss_by_cached_sizes=[])
    ratios = list(ratios)
    for r in ratios:
        ref["size"][(r, "float32")] = req.size(client, r)
    # budgets halfway between consecutive sizes' float32 GB: each fits a size between the two
    ordered = sorted(ratios, reverse=True)
    for hi, lo in zip(ordered, ordered[1:]):
        params = (_params(ref["size"][(hi, "float32")][1]) + _params(ref["size"][(lo, "float32")][1])) / 2
        gb = float(f"{params * 4 / 1e9:.4g}")
        fitted, text = ref["budget"][gb] = req.budget(client, gb)
        if fitted not in ratios:
            ratios.append(fitted)
            ref["size"][(fitted, "float32")] = req.size(client, fitted)
    keys = [(r, "float32") for r in ratios] + ([(bf16_ratio, "bfloat16")] if bf16_ratio is not None else [])
    if bf16_ratio is not None:
        ref["size"][(bf16_ratio, "bfloat16")] = req.size(client, bf16_ratio, "bfloat16")
    ref["rss_by_cached_sizes"].append(dict(chatted_keys=0, key=None, rss_mb=round(app.rss()[0] / MB, 1)))
    for i, (r, dtype) in enumerate(keys):
        for prompt in prompts:
            ref["chat"][(r, dtype, prompt)] = req.chat(client, r, prompt, dtype)[0]
        ref["rss_by_cached_sizes"].append(dict(chatted_keys=i + 1, key=f"{r:g}/{dtype}",
                                               rss_mb=round(app.rss()[0] / MB, 1)))
    for r in ppl_ratios:
        ref["perplexity"][(r, "float32")] = req.perplexity(client, r)
        if exports:
            ref["export"][(r, "float32")] = req.export(client, r)
    ref["keys"] = keys
    return ref


# -- the load -----------------------------------------------------------------------------------
class Tally:
    """Thread-safe counts, latencies, errors and mismatches per request kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency = defaultdict(list)
        self.errors = defaultdict(int)
        self.mismatches = defaultdict(int)
        self.samples = []  # the first few errors and mismatches, for the report

    def ok(self, kind: str, seconds: float, matched: bool, detail: str = "") -> None:
        with self.lock:
            self.latency[kind].append(seconds)
            if not matched:
                self.mismatches[kind] += 1
                if len(self.samples) < 20:
                    self.samples.append(f"mismatch {kind}: {detail}")

    def error(self, kind: str, err: BaseException) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.samples) < 20:
                self.samples.append(f"error {kind}: {type(err).__name__}: {str(err)[:300]}")


def user(n: int, app: AppProcess, req: Requests, ref: dict, deadline: float, tally: Tally,
         think_s: float, seed: int, mix=MIX) -> None:
    """One simulated user: its own session, a random mix of requests until the deadline."""
    rng = random.Random(seed * 1000 + n)
    start = time.perf_counter()
    try:
        client = app.session(f"10.0.1.{n + 1}")  # each simulated user its own address (public mode)
    except Exception as err:
        tally.error("start", err)
        return
    tally.ok("start", time.perf_counter() - start, True)
    keys, prompts = ref["keys"], sorted({p for _, _, p in ref["chat"]})
    ratio, dtype = rng.choice(keys)
    kinds, weights = zip(*mix)
    while time.perf_counter() < deadline:
        kind = rng.choices(kinds, weights)[0]
        start = time.perf_counter()
        try:
            if kind == "size":  # a slider move
                ratio, dtype = rng.choice(keys)
                got, want = req.size(client, ratio, dtype), ref["size"][(ratio, dtype)]
                detail = f"size {ratio} {dtype}: {got[0]!r} != {want[0]!r}"
            elif kind == "budget":  # a budget query; the slider moves to the size that fits
                gb = rng.choice(sorted(ref["budget"]))
                got, want = req.budget(client, gb), ref["budget"][gb]
                ratio, dtype = got[0], "float32"
                detail = f"budget {gb}: {got} != {want}"
            elif kind == "chat":
                prompt = rng.choice(prompts)
                got = req.chat(client, ratio, prompt, dtype)[0]
                want = ref["chat"][(ratio, dtype, prompt)]
                detail = f"chat {ratio} {dtype} {prompt!r}: {got[:80]!r} != {want[:80]!r}"
            elif kind == "chat_pair":  # side by side: A at the selected size, B at another one
                prompt = rng.choice(prompts)
                ratio_b = rng.choice([r for r, d in keys if d == dtype])
                got = req.chat(client, ratio, prompt, dtype, ratio_b)
                want = (ref["chat"][(ratio, dtype, prompt)], ref["chat"][(ratio_b, dtype, prompt)])
                detail = f"chat pair {ratio}|{ratio_b} {dtype} {prompt!r}: {got} != {want}"
            elif kind == "export":  # at one of the sizes that have a reference
                r = rng.choice(sorted(r for r, _ in ref["export"]))
                got, want = req.export(client, r), ref["export"][(r, "float32")]
                detail = f"export {r}: {got} != {want}"
            else:  # perplexity at one of the sizes that have a reference
                r = rng.choice(sorted(r for r, _ in ref["perplexity"]))
                got, want = req.perplexity(client, r), ref["perplexity"][(r, "float32")]
                detail = f"perplexity {r}: {got} != {want}"
        except Exception as err:
            tally.error(kind, err)
        else:
            tally.ok(kind, time.perf_counter() - start, got == want, detail)
        if think_s:
            time.sleep(rng.uniform(0, think_s))


def percentile(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def explorer_cache_limit() -> int | None:
    """The number of materialized (size, dtype) models an Explorer keeps (app.py uses the default)."""
    try:
        import inspect

        from acip_core.serving.explorer import Explorer
        return inspect.signature(Explorer.open).parameters["cache_size"].default
    except Exception:
        return None


def run(artifact: str | Path = DEFAULT_ARTIFACT, clients: int = 8, seconds: float = 120,
        ratios=DEFAULT_RATIOS, bf16_ratio: float | None = 0.55, ppl_ratios=None, prompts=PROMPTS,
        max_new_tokens: int = 32, ppl_windows: int = 2, ppl_seq_len: int = 128, think_s: float = 0.3,
        seed: int = 0, runs_dir: str | Path | None = None, log=print, public: bool = False,
        exports_bytes: float = 600e6) -> dict:
    """Launches the app, asks the lone user's references, runs the load; returns the report dict."""
    artifact = str(artifact)
    ppl_ratios = list(ppl_ratios if ppl_ratios is not None else ratios[::2])
    req = Requests(artifact, max_new_tokens, ppl_windows, ppl_seq_len)
    mix = MIX_PUBLIC if public else MIX
    scratch = Path(tempfile.mkdtemp(prefix="acip-load-scratch-"))
    env = dict(TMPDIR=str(scratch / "tmp"), GRADIO_TEMP_DIR=str(scratch / "gradio"))  # measured: disk
    (scratch / "tmp").mkdir()
    if public:  # X-Forwarded-For as a Space's proxy sets it: one address per simulated visitor
        env.update(ACIP_PUBLIC="1", ACIP_LIMIT_EXPORTS_BYTES=str(int(exports_bytes)), ACIP_PROXY_HOPS="1")
    t0 = time.perf_counter()
    with AppProcess(artifact, runs_dir, env=env) as app:
        log(f"app up in {app.ready_s:.1f} s (pid {app.proc.pid}, {app.url})")
        req.artifact = app.listed  # what the page lists for it (its name in public mode)
        rss_loaded = app.rss()[0]
        start = time.perf_counter()
        ref = lone_user(app, req, ratios, bf16_ratio, ppl_ratios, prompts, exports=public)
        lone_s = time.perf_counter() - start
        rss_ref = app.rss()[0]
        log(f"lone user: {len(ref['chat'])} chats, {len(ref['size'])} sizes, {len(ref['budget'])} budgets, "
            f"{len(ref['perplexity'])} perplexities in {lone_s:.1f} s")
        tally, sampler, disk = Tally(), RssSampler(app.proc.pid), DiskSampler([scratch])
        sampler.start()
        disk.start()
        start = time.perf_counter()
        deadline = start + seconds
        threads = [threading.Thread(target=user, args=(i, app, req, ref, deadline, tally, think_s, seed, mix),
                                    name=f"user {i}") for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_s = time.perf_counter() - start
        samples = sampler.stop()
        disk_samples = disk.stop()
        strange = strangers(app, req, prompts[0], log) if public else None
        rss_end, hwm = app.rss()
        tracebacks = app.log_text().count("Traceback (most recent call last)")
        log_bytes = app.log_path.stat().st_size
        log_tail = app.log_tail(30) if tracebacks else ""
    kinds = ["start"] + [k for k, _ in mix]
    per_kind = {}
    for k in kinds + sorted(set(tally.errors) - set(kinds)):
        lat = tally.latency.get(k, [])
        per_kind[k] = dict(requests=len(lat) + tally.errors.get(k, 0), errors=tally.errors.get(k, 0),
                           mismatches=tally.mismatches.get(k, 0),
                           p50_s=round(percentile(lat, 0.5), 3), p95_s=round(percentile(lat, 0.95), 3),
                           max_s=round(max(lat), 3) if lat else float("nan"))
    peak = max((b for _, b in samples), default=0)
    half = len(samples) // 2
    report = dict(
        artifact=artifact, clients=clients, seconds=seconds, load_wall_s=round(load_s, 1),
        settings=dict(ratios=list(ratios), bf16_ratio=bf16_ratio, ppl_ratios=ppl_ratios, prompts=list(prompts),
                      max_new_tokens=max_new_tokens, ppl_windows=ppl_windows, ppl_seq_len=ppl_seq_len,
                      think_s=think_s, seed=seed, mix=dict(mix), public=public,
                      exports_bytes_limit=exports_bytes if public else None),
        app_ready_s=round(app.ready_s, 1), lone_user_s=round(lone_s, 1),
        requests=sum(v["requests"] for v in per_kind.values()),
        errors=sum(v["errors"] for v in per_kind.values()),
        mismatches=sum(v["mismatches"] for v in per_kind.values()),
        requests_per_s=round(sum(len(v) for v in tally.latency.values()) / load_s, 2),
        per_kind=per_kind, samples=tally.samples, server_tracebacks=tracebacks, server_log_tail=log_tail,
        distinct_replies=dict(sorted((p, len({t for (_, _, q), t in ref["chat"].items() if q == p}))
                                     for p in prompts)),
        cached_sizes=dict(distinct_keys_used=len(ref["keys"]), keys=[f"{r:g}/{d}" for r, d in ref["keys"]],
                          explorer_cache_limit=explorer_cache_limit()),
        rss=dict(after_load_mb=round(rss_loaded / MB, 1), after_lone_user_mb=round(rss_ref / MB, 1),
                 peak_load_mb=round(peak / MB, 1),
                 first_half_peak_mb=round(max((b for _, b in samples[:half]), default=0) / MB, 1),
                 second_half_peak_mb=round(max((b for _, b in samples[half:]), default=0) / MB, 1),
                 first_half_low_mb=round(min((b for _, b in samples[:half]), default=0) / MB, 1),
                 second_half_low_mb=round(min((b for _, b in samples[half:]), default=0) / MB, 1),
                 end_mb=round(rss_end / MB, 1), vm_hwm_mb=round(hwm / MB, 1),
                 by_cached_sizes=ref["rss_by_cached_sizes"],
                 timeline_mb=[(t, round(b / MB, 1)) for t, b in samples[::4]]),
        disk=dict(peak_mb=round(max((b for _, b in disk_samples), default=0) / MB, 1),
                  end_mb=round(tree_bytes(scratch) / MB, 1),
                  timeline_mb=[(t, round(b / MB, 1)) for t, b in disk_samples[::5]]),
        strangers=strange, app_log_bytes=log_bytes,
        total_s=round(time.perf_counter() - t0, 1))
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return report


# -- public mode: what strangers send (issue 28) ----------------------------------------------------
# A visitor's chat while strangers attack is answered within VICTIM_FACTOR × the same chat on the quiet
# app + VICTIM_SLACK_S: the attacks are refused cheaply (their cost bounded by public.Limits), and
# forward passes take turns (explorer.ComputeGate), so the one allowed worst-case history costs at
# most one more chat's worth of compute at a time.
VICTIM_FACTOR, VICTIM_SLACK_S = 3.0, 10.0
MARKUP = ('<img src="http://127.0.0.1:9/x.png"> ![x](http://127.0.0.1:9/y.png) '
          '<a href="http://127.0.0.1:9/z">z</a> **bold**')


def _upload(url: str, payload: bytes, address: str) -> int:
    boundary = "acipload"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f.txt\"\r\n"
            "Content-Type: text/plain\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "X-Forwarded-For": address})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def strangers(app: AppProcess, req: Requests, prompt: str, log=print) -> dict:
    """Public mode, after the load: a quiet visitor's chat is timed alone, then again while strangers
    send (a) a history of 12,000 tiny messages, (b) the largest history allowed (chat_messages tiny
    messages), (c) an upload flood (10 different 9 MB files from one address) and a file with NUL
    bytes, (d) markup strings as a prompt and as sweep sizes. Reports each attack's answer and
    time, and whether the visitor's chat came within VICTIM_FACTOR × quiet + VICTIM_SLACK_S."""
    from acip_core.serving.public import limits

    cap = limits({"ACIP_PUBLIC": "1"}).chat_messages
    visitor = app.session("10.0.2.1")
    start = time.perf_counter()
    quiet_reply = req.chat(visitor, 1.0, prompt)
    quiet_s = time.perf_counter() - start
    out, threads = dict(quiet_chat_s=round(quiet_s, 2)), []

    def timed(name, fn):
        def work():
            t = time.perf_counter()
            try:
                out[name] = dict(answer=str(fn())[:200])
            except Exception as err:  # a refusal is the expected answer of most attacks
                out[name] = dict(refused=f"{type(err).__name__}: {str(err)[:200]}")
            out[name]["seconds"] = round(time.perf_counter() - t, 2)
        threads.append(threading.Thread(target=work, name=name))

    def history(n):
        return [dict(role="user" if i % 2 == 0 else "assistant", content=[dict(type="text", text="a")])  # as the page sends it
                for i in range(n)]

    def chat_with(history_a, address, message=prompt):
        client = app.session(address)
        return client.predict(req.artifact, 1.0, req.artifact, 1.0, False, message, history_a, [],
                              req.max_new_tokens, 1.15, "float32", api_name="/chat")[2]

    timed("history_12000_messages", lambda: chat_with(history(12_000), "10.0.3.1"))
    timed(f"history_{cap}_messages", lambda: chat_with(history(cap), "10.0.3.2"))
    flood = lambda: [_upload(app.url, os.urandom(9 * 10**6 // 2).hex().encode()[:9 * 10**6], "10.0.3.3")
                     for _ in range(10)]
    timed("upload_flood_10x9MB", flood)
    timed("upload_nul", lambda: _upload(app.url, b"text\0binary" * 100, "10.0.3.4"))
    timed("markup_prompt", lambda: chat_with([], "10.0.3.5", MARKUP))
    timed("markup_sweep_sizes", lambda: app.session("10.0.3.6").predict(
        req.artifact, MARKUP, prompt, 4, "float32", api_name="/sweep"))
    for t in threads:
        t.start()
    time.sleep(1.0)  # the attacks are under way
    start = time.perf_counter()
    loaded_reply = req.chat(visitor, 1.0, prompt)
    out["visitor_chat_s"] = round(time.perf_counter() - start, 2)
    for t in threads:
        t.join()
    out["visitor_bound_s"] = round(VICTIM_FACTOR * quiet_s + VICTIM_SLACK_S, 2)
    out["visitor_within_bound"] = out["visitor_chat_s"] <= out["visitor_bound_s"]
    out["visitor_same_reply"] = loaded_reply == quiet_reply
    log(f"strangers: visitor's chat {out['visitor_chat_s']} s (quiet {quiet_s:.2f} s, bound "
        f"{out['visitor_bound_s']} s); " + "; ".join(f"{k}: {v}" for k, v in out.items() if isinstance(v, dict)))
    return out


def summary(report: dict) -> str:
    rss, cache = report["rss"], report["cached_sizes"]
    lines = [f"{report['clients']} clients × {report['load_wall_s']} s on {report['artifact']}: "
             f"{report['requests']} requests ({report['requests_per_s']}/s), {report['errors']} errors, "
             f"{report['mismatches']} mismatches with the lone user, {report['server_tracebacks']} server tracebacks "
             f"(app ready in {report['app_ready_s']} s, lone user {report['lone_user_s']} s)",
             f"{'kind':<11}{'requests':>9}{'errors':>8}{'mismatch':>9}{'p50 s':>9}{'p95 s':>9}{'max s':>9}"]
    for kind, v in report["per_kind"].items():
        lines.append(f"{kind:<11}{v['requests']:>9}{v['errors']:>8}{v['mismatches']:>9}"
                     f"{v['p50_s']:>9.3f}{v['p95_s']:>9.3f}{v['max_s']:>9.3f}")
    steps = ", ".join(f"{s['rss_mb']:.0f}" for s in rss["by_cached_sizes"])
    lines += [f"RSS: {rss['after_load_mb']:.0f} MB loaded, {rss['after_lone_user_mb']:.0f} MB after the lone user, "
              f"peak {rss['peak_load_mb']:.0f} MB under load (low/peak 1st half {rss['first_half_low_mb']:.0f}/"
              f"{rss['first_half_peak_mb']:.0f}, 2nd half {rss['second_half_low_mb']:.0f}/"
              f"{rss['second_half_peak_mb']:.0f}), VmHWM {rss['vm_hwm_mb']:.0f} MB",
              f"RSS after chatting at 0..{len(rss['by_cached_sizes']) - 1} sizes ({', '.join(cache['keys'])}): "
              f"{steps} MB; {cache['distinct_keys_used']} (size, dtype) keys used, "
              f"Explorer cache limit {cache['explorer_cache_limit']}"]
    if "disk" in report:
        lines.append(f"disk (app temp + Gradio cache): peak {report['disk']['peak_mb']:.0f} MB, "
                     f"{report['disk']['end_mb']:.0f} MB at the end")
    if report.get("strangers"):
        st = report["strangers"]
        lines.append(f"strangers: a visitor's chat took {st['visitor_chat_s']} s during the attacks (quiet "
                     f"{st['quiet_chat_s']} s, bound {st['visitor_bound_s']} s: "
                     f"{'within' if st['visitor_within_bound'] else 'OVER'}); app log {report['app_log_bytes']} bytes")
        lines += [f"  {k}: {v}" for k, v in st.items() if isinstance(v, dict)]
    lines += report["samples"][:10]
    if report["server_log_tail"]:
        lines += ["server log tail:", report["server_log_tail"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--artifact", default=str(DEFAULT_ARTIFACT))
    common.add_json(parser)
    parser.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)),
                        help="chat/slider sizes (budgets between them add more)")
    parser.add_argument("--bf16-ratio", type=float, default=0.55, help="one bfloat16 size (negative: none)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--public", action="store_true",
                        help="the app in public mode (ACIP_PUBLIC=1), exports in the mix, their disk bounded")
    parser.add_argument("--exports-mb", type=float, default=600, help="public: the exports bound (MB)")
    args = parser.parse_args()
    report = run(args.artifact, args.clients, args.seconds, [float(r) for r in args.ratios.split(",")],
                 args.bf16_ratio if args.bf16_ratio >= 0 else None, max_new_tokens=args.max_new_tokens,
                 seed=args.seed, public=args.public, exports_bytes=args.exports_mb * 1e6)
    print(summary(report))
    if args.json:
        common.write_result("load_test", report, args.json or None)
    strange = report.get("strangers") or {}
    failed = strange and not (strange["visitor_within_bound"] and strange["visitor_same_reply"])
    return 1 if report["errors"] or report["mismatches"] or report["server_tracebacks"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())

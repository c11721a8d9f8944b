"""The app's guards on what a request can make the server store, as ASGI middleware: Gradio's upload
route (POST /gradio_api/upload, UploadGuard) and, on a public Space, files named by URL in an API call
(RemoteFileGuard).

Gradio 6 caps one file (launch(max_file_size=...)) but not how much one visitor uploads, and it
stores any bytes. The route itself cannot be given a hook, but the FastAPI app Gradio creates
accepts middleware (launch(app_kwargs={"middleware": [...]})), which sees every request first:
- public mode: each client IP may upload public.Limits.visitor_upload_bytes per hour and all
  visitors together Limits.total_upload_bytes, counted by Content-Length before the body is read
  (a request without one is refused: its size would be unknown until stored);
- everywhere: a stored file holding a NUL byte is not text (the app's only upload is calibration
  text): it is deleted and the upload answered 400, so it is never kept for an hour.

Gradio also downloads, before any handler runs, every file an event's payload names by an http(s)
`path` (a FileData in a gr.File value or a chat history), with no size bound and past the upload
quota. The app's own page only sends paths of files it uploaded, so on a public Space such a payload
is refused (400), and a payload is read whole only up to MAX_API_BODY.
"""

from __future__ import annotations

import json
import logging
import os
import re
from types import SimpleNamespace

from acip_core.serving import public

log = logging.getLogger("acip_studio")


MAX_API_BODY = 8 * 2**20  # an event's JSON payload (a chat history is the largest the page sends)
_API_CALL = re.compile(r"/gradio_api/(queue/join|run/|api/|call/)")


def _is_upload(scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith(
        "/gradio_api/upload")


async def _answer(send, status: int, text: str) -> None:
    body = text.encode()
    await send(dict(type="http.response.start", status=status,
                    headers=[(b"content-type", b"text/plain; charset=utf-8"),
                             (b"content-length", str(len(body)).encode())]))
    await send(dict(type="http.response.body", body=body))


async def _drain(receive) -> None:
    """Reads a request's body and keeps none of it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class UploadGuard:
    """ASGI middleware: bounds uploads per visitor and in total (public mode), refuses non-text files."""

    latest: "UploadGuard | None" = None  # the app's guard (tests and the load test read its quota)

    def __init__(self, app, limits: public.Limits | None = None):
        UploadGuard.latest = self
        self.app = app
        self.limits = limits or public.limits()
        self.quota = public.UploadQuota(self.limits.visitor_upload_bytes, self.limits.total_upload_bytes)

    async def __call__(self, scope, receive, send):
        if not _is_upload(scope):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.limits.public:
            request = SimpleNamespace(headers=headers, client=SimpleNamespace(host=(scope.get("client") or [None])[0]))
            key = public.visitor_keys(request)[-1]  # the IP where known, else the session key
            length = headers.get("content-length", "").strip()
            if not length.isascii() or not length.isdigit():  # int() would take "+5", "1_0", "٣"
                return await _answer(send, 411, "an upload needs a Content-Length header on this public Space")
            length = int(length)
            try:
                self.quota.take(key, length)
            except ValueError as err:
                log.info("upload refused (%s, %d bytes): %s", key, length, err)
                if length <= 2 * self.limits.upload_bytes:  # read and dropped, so the client reads the answer
                    await _drain(receive)
                return await _answer(send, 429, str(err))
        sent = []

        async def keep(message):  # the answer waits until the stored files are checked
            sent.append(message)

        await self.app(scope, receive, keep)  # Gradio's background move into its cache has run too
        start = next((m for m in sent if m["type"] == "http.response.start"), None)
        if start is not None and start["status"] == 200:
            body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
            try:
                paths = [p for p in json.loads(body) if isinstance(p, str)]
            except (ValueError, TypeError):
                paths = []
            bad = public.nul_files(paths)
            if bad:
                for path in paths:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                log.info("upload refused: %d of %d files hold NUL bytes", len(bad), len(paths))
                return await _answer(send, 400, "the uploaded file is not text (it holds NUL bytes)")
        for message in sent:
            await send(message)


def _names_remote_file(value) -> bool:
    """Whether a JSON payload holds a dict whose `path` is an http(s) URL (what Gradio would fetch)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and path.strip().lower().startswith(("http://", "https://")):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class RemoteFileGuard:
    """ASGI middleware (public mode): an API call whose payload names a file by URL is refused, and
    one larger than MAX_API_BODY too; others pass with their body unchanged."""

    def __init__(self, app, limits: public.Limits | None = None):
        self.app = app
        self.public = (limits or public.limits()).public

    async def __call__(self, scope, receive, send):
        if not (self.public and scope["type"] == "http" and scope["method"] == "POST"
                and _API_CALL.search(scope["path"])):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_API_BODY:
                return await _answer(send, 413, f"a request's payload may hold at most {MAX_API_BODY // 2**20} MB here")
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            remote = _names_remote_file(json.loads(body))
        except (ValueError, RecursionError):
            remote = False  # not JSON: Gradio answers it
        if remote:
            log.info("refused an API call that names a file by URL (%s)", scope["path"])
            return await _answer(send, 400, "files are uploaded to this Space first (POST /gradio_api/upload); "
                                             "a file named by URL is not fetched")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return dict(type="http.request", body=body, more_body=False)
            return await receive()

        return await self.app(scope, replay, send)

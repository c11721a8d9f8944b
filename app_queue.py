"""When a request reached the server, for the app's Stop and Cancel: a job still waiting in Gradio's
queue when its visitor pressed Stop/Cancel is dropped when its turn comes (app_handlers.StopEvent),
instead of running in full. Gradio's own `cancels=` does drop a queued job, but cancelling a running
one puts an "Error" overlay on every output of the event, so the app does not use it.

`ArrivalStamp` (ASGI middleware) writes the arrival time (time.monotonic) into each HTTP request's
scope; a handler's gr.Request wraps the starlette request of its queue join, so `arrived(request)` is
when that job entered the queue (None outside a launched app: in-process calls, tests)."""

from __future__ import annotations

import time

ARRIVED = "acip_arrived"


class ArrivalStamp:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope[ARRIVED] = time.monotonic()
        return await self.app(scope, receive, send)


def arrived(request) -> float | None:
    """When the job of this gr.Request reached the server (monotonic seconds), or None."""
    scope = getattr(getattr(request, "request", None), "scope", None)
    value = scope.get(ARRIVED) if isinstance(scope, dict) else None
    return value if isinstance(value, float) else None

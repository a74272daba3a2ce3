"""ASGI middleware: request telemetry, and the request body limit.

Plain ASGI rather than BaseHTTPMiddleware: no extra task per request, and streaming
responses pass through untouched.
"""

from __future__ import annotations

import contextlib
import json

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import telemetry
from api.telemetry import metrics, recording

log = structlog.get_logger(__name__)
UNTRACKED = frozenset({"/metrics"})


class RequestTelemetry:
    """Per request: the server span (continuing a W3C traceparent), the request id (from
    X-Request-ID or new, echoed back), the RED metrics labelled by route template, and one
    access log line written inside the span, so it and the exemplar carry the trace id.
    What is recorded is recorded by compiled code (api/telemetry/recording.pyx); this is
    the ASGI shell around it.

    The span is made here rather than by an ASGI instrumentation layer: the contrib
    FastAPIInstrumentor and FastAPI's native telemetry each cost more per request than
    everything else this middleware does (docs/BENCHMARKS.md)."""

    def __init__(
        self,
        app: ASGIApp,
        access_log_on: bool = True,
        tracing_on: bool = True,
    ) -> None:
        self.app = app
        self.recorder = recording.Recorder(access_log_on, tracing_on)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED:
            await self.app(scope, receive, send)  # failures: main._last_resort answers
            return
        request = self.recorder.begin(scope, send)
        try:
            await self.app(scope, receive, request)
        except Exception as exc:
            # Answered here, not by Starlette's outermost handler: there the request id
            # and the trace would already be gone from the line, the span and the response.
            request.failed(exc)
            await _failed(request, request.started)
        finally:
            request.finish(scope)


async def _failed(send: Send, started: bool) -> None:
    """An exception no handler answered, inside an `except`: logged with its traceback,
    counted, and answered with a 500 that says nothing of it. If the response has begun,
    the exception goes on to the server, which cuts the connection."""
    telemetry.count(metrics.ERRORS, type="internal")
    log.exception("unhandled error")
    if started:
        raise  # noqa: PLE0704  # called from an except block: the exception it handles
    body = b'{"detail":"internal error"}'
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Reject request bodies over `max_bytes` with 413 before they are buffered or parsed.
    Content-Length is checked up front; chunked bodies are counted as they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0
        overflow = started = False

        async def counting_receive() -> Message:
            nonlocal seen, overflow
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    overflow = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Whatever the app made of the interrupted body (FastAPI turns it into a 400),
            # the answer is 413.
            if overflow:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if overflow and not started:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

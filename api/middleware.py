"""ASGI middleware: request telemetry, and the request body limit.

Plain ASGI rather than BaseHTTPMiddleware: no extra task per request, and streaming
responses pass through untouched.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import telemetry
from api.telemetry import logs, metrics

log = structlog.get_logger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNTRACKED = frozenset({"/metrics"})
UNTRACED = frozenset({"/metrics", "/health", "/ready"})  # probes would drown real traces
_PROPAGATED = {name.encode(): name for name in ("traceparent", "tracestate", "baggage")}
_PROPAGATED_KEYS = _PROPAGATED.keys()
# OpenTelemetry's HTTP conventions (and its contrib instrumentations' list, QUERY
# included): a method outside these is "_OTHER" in labels and span names, so a client
# cannot mint metric series (or span names) by inventing methods. Case-sensitive, as the
# conventions say.
_KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE")
)


class RequestTelemetry:
    """Per request: the server span (continuing a W3C traceparent), the request id (from
    X-Request-ID or new, echoed back), the RED metrics labelled by route template, and one
    access log line written inside the span, so it and the exemplar carry the trace id.

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
        self.access_log_on = access_log_on
        self.tracing_on = tracing_on
        # telemetry.child/series, keyed by position here: the label values are bounded
        # (known methods, route templates, status codes), and a lookup by keywords cost
        # more than the update it finds.
        self._active: dict[str, Any] = {}
        self._durations: dict[tuple[str, str, int], metrics.Series] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED:
            await self.app(scope, receive, send)  # failures: main._last_resort answers
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        # Not uuid4: a request id needs uniqueness, not unpredictability, and urandom is a
        # system call per request.
        request_id = given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"
        given_method = scope["method"]
        method = given_method if given_method in _KNOWN_METHODS else "_OTHER"
        span = None
        if self.tracing_on and scope["path"] not in UNTRACED:
            parent = _caller(scope["headers"]) if _PROPAGATED_KEYS & headers.keys() else None
            attributes = {
                "http.request.method": method,
                "url.path": scope["path"],
                "url.scheme": scope.get("scheme", "http"),
            }
            if method != given_method:
                attributes["http.request.method_original"] = given_method
            span_method = "HTTP" if method == "_OTHER" else method
            span = telemetry.tracer().start_span(
                span_method, context=parent, kind=SpanKind.SERVER, attributes=attributes
            )
            # On the caller's context, so its baggage goes on with the trace.
            span_token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 500
        notes: dict[str, object] = {}
        notes_token = telemetry.request_notes.set(notes)
        structlog.contextvars.bind_contextvars(request_id=request_id)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        measured = telemetry.metrics_enabled()
        if measured:
            active: Any = self._active.get(method)
            if active is None:
                active = self._active[method] = telemetry.child(
                    metrics.HTTP_ACTIVE, http_request_method=method
                )
            active.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Answered here, not by Starlette's outermost handler: there the request id
            # and the trace would already be gone from the line, the span and the response.
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            if started:  # the status already sent is not what happened
                notes["aborted"] = True
            await _failed(send_with_id, started)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"  # never the raw path
            if measured:
                active.dec()
                labels = (method, template, status)
                durations = self._durations.get(labels)
                if durations is None:
                    durations = self._durations[labels] = telemetry.series(
                        metrics.HTTP_DURATION,
                        http_request_method=method,
                        http_route=template,
                        http_response_status_code=str(status),
                    )
                durations.observe(elapsed, telemetry.current_trace_id())
            if self.access_log_on:
                logs.access(
                    {
                        "method": given_method,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        **notes,
                    },
                    request_id,
                    None if span is None else span.get_span_context(),
                )
            structlog.contextvars.unbind_contextvars("request_id")
            telemetry.request_notes.reset(notes_token)
            if span is not None:
                span.update_name(f"{span_method} {template}")
                span.set_attributes({"http.route": template, "http.response.status_code": status})
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
                otel_context.detach(span_token)


def _caller(raw: list[tuple[bytes, bytes]]) -> otel_context.Context:
    """The caller's context from its W3C headers. A header sent several times is one list
    (RFC 9110): tracestate and baggage members are joined, and a repeated traceparent is
    ambiguous, so it is ignored and a new trace begins, as the W3C test suite expects."""
    values: dict[str, list[str]] = {}
    for key, value in raw:
        if (name := _PROPAGATED.get(key)) is not None:
            values.setdefault(name, []).append(value.decode("latin-1"))
    if len(values.get("traceparent", ())) > 1:
        del values["traceparent"]
    return propagate.extract({name: ",".join(found) for name, found in values.items()})


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

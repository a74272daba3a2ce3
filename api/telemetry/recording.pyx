# cython: language_level=3
"""What the request middleware records for every request, compiled with Cython.

Per request: the request id (from X-Request-ID or new, echoed back), the server span
(continuing a W3C traceparent), the RED metrics labelled by route template, and one access
line written inside the span. `api/middleware.py` is the ASGI shell around it.

Why compiled: with everything on, telemetry cost a cached answer ~75 µs of worker CPU on
top of ~205 µs, and most of it was the interpreter running many small steps, each cheap
(docs/BENCHMARKS.md). Here the same steps run as C calls. The behaviour is the one the
tests describe. Our own spans, metric sums and the log line queue are called as C
(spans.pxd, tallies.pxd); anything else (another tracer, a NonRecordingSpan) through its
Python API.

`make install` (pip install -e .) builds it; after editing this file, run it again.
"""

from cpython.contextvars cimport PyContextVar_Reset, PyContextVar_Set
from libc.math cimport round as round_half_away
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from api.telemetry.hexids cimport hex64, hex128
from api.telemetry.spans cimport (
    LeanSpan,
    LeanTracer,
    attach,
    detach,
    span_context_of,
    with_span,
)
from api.telemetry.spancontext cimport (
    IS_VALID,
    SAMPLED,
    SPAN_ID,
    TRACE_FLAGS,
    TRACE_ID,
    field,
)
from api.telemetry.tallies cimport LineQueue, Series, Tally, enabled as metrics_enabled


cdef extern from "Python.h":
    # A dict with room for `minused` keys: the access line's fields are known in number,
    # and a dict grown from empty resizes twice on the way.
    dict _PyDict_NewPresized(Py_ssize_t minused)

import random
import time

import orjson
import structlog
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from api import telemetry
from api.telemetry import logs, metrics, traces

UNTRACED = frozenset({"/metrics", "/health", "/ready"})  # probes would drown real traces
_PROPAGATED = {name.encode(): name for name in ("traceparent", "tracestate", "baggage")}
# OpenTelemetry's HTTP conventions (and its contrib instrumentations' list, QUERY
# included): a method outside these is "_OTHER" in labels and span names, so a client
# cannot mint metric series (or span names) by inventing methods. Case-sensitive, as the
# conventions say.
_KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE")
)
# Not uuid4: a request id needs uniqueness, not unpredictability, and urandom is a system
# call per request. The random module reseeds itself in every forked worker.
_getrandbits = random.getrandbits
_ERROR = Status(StatusCode.ERROR)
_SERVER = SpanKind.SERVER
_dumps = orjson.dumps
_LINE = orjson.OPT_APPEND_NEWLINE
# Both are changed in place, never rebound: read here without the module lookups.
cdef dict _ACCESS = logs._access
cdef LineQueue _QUEUE = logs.LINES.queue


def _request_id_var():
    """structlog's context variable for `request_id`, through its public API: the one
    `bind_contextvars` sets and `merge_contextvars` reads."""
    token = structlog.contextvars.bind_contextvars(request_id=None)["request_id"]
    token.var.reset(token)
    return token.var


_REQUEST_ID_VAR = _request_id_var()
_NOTES_VAR = telemetry.request_notes


cdef double _monotonic():
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)  # what time.perf_counter reads on Linux
    return now.tv_sec + now.tv_nsec * 1e-9


cdef inline double _milliseconds(double seconds) noexcept:
    """In ms to two decimals. round(seconds * 1000, 2) rounds the exact decimal and costs
    ~3,300 instructions a call (docs/BENCHMARKS.md, session 11); this can differ from it by
    0.01 where the scaled value lies within a rounding error of a half."""
    return round_half_away(seconds * 100000.0) / 100.0


cdef bint _valid_id(bytes given):
    """^[A-Za-z0-9._:-]{1,128}$, the ids we echo back unchanged."""
    cdef Py_ssize_t n = len(given)
    cdef const unsigned char* text = given
    cdef unsigned char c
    if n < 1 or n > 128:
        return False
    for i in range(n):
        c = text[i]
        if not (
            (c >= b"a" and c <= b"z")
            or (c >= b"A" and c <= b"Z")
            or (c >= b"0" and c <= b"9")
            or c == b"."
            or c == b"_"
            or c == b":"
            or c == b"-"
        ):
            return False
    return True


cdef long long _second = -1
cdef str _second_text = ""


cdef str _timestamp():
    """ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True)
    writes it (logs.add_timestamp), the date formatted once a second."""
    global _second, _second_text
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    cdef long long seconds = now.tv_sec
    cdef long micro = (now.tv_nsec + 500) // 1000
    if micro == 1000000:
        seconds += 1
        micro = 0
    if seconds != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = seconds
    return f"{_second_text}.{micro:06d}Z"


def access(dict fields, str request_id, object context):
    """The access line, written once per request. In JSON it is rendered here, without
    structlog's processor chain: in a busy worker that chain cost ~30 µs a line. The
    keys, their order and their values are what structlog writes for
    `get_logger("api.access").info("request", **fields)` inside the request
    (tests/test_logs.py compares the two)."""
    if context is not None and context.is_valid:
        _access(fields, request_id, hex128(context.trace_id), context.span_id)
    else:
        _access(fields, request_id, None, None)


cdef void _access(dict fields, str request_id, object trace_id, object span_id) except *:
    """`access`, with the trace id already written as hex (it is the exemplar's too)."""
    if not _ACCESS["on"]:
        return
    if not _ACCESS["json"]:  # development: the console renderer, through structlog
        structlog.get_logger("api.access").info("request", **fields)
        return
    fields["event"] = "request"
    fields["request_id"] = request_id
    fields["level"] = "info"
    fields["logger"] = "api.access"
    fields["pid"] = logs._pid
    if trace_id is not None:
        fields["trace_id"] = trace_id
        fields["span_id"] = hex64(span_id)
    fields["timestamp"] = _timestamp()
    if _QUEUE.add(_dumps(fields, str, _LINE), False):
        logs.LINES.flush()


def _caller(list raw):
    """The caller's context from its W3C headers. A header sent several times is one list
    (RFC 9110): tracestate and baggage members are joined, and a repeated traceparent is
    ambiguous, so it is ignored and a new trace begins, as the W3C test suite expects."""
    values = {}
    for key, value in raw:
        name = _PROPAGATED.get(key)
        if name is not None:
            values.setdefault(name, []).append(value.decode("latin-1"))
    if len(values.get("traceparent", ())) > 1:
        del values["traceparent"]
    return propagate.extract({name: ",".join(found) for name, found in values.items()})


cdef class Recorder:
    """One per app: what is on, and each label set's metric series, found once (the
    label values are bounded: known methods, route templates, status codes)."""

    cdef public bint access_log_on
    cdef public bint tracing_on
    cdef dict _active
    cdef dict _durations

    def __init__(self, bint access_log_on=True, bint tracing_on=True):
        self.access_log_on = access_log_on
        self.tracing_on = tracing_on
        self._active = {}
        self._durations = {}

    def begin(self, dict scope, send):
        """A request's recording, begun: its span current, its id bound for log lines.
        The returned `Request` is the `send` to hand the app."""
        cdef Request request = Request.__new__(Request)
        cdef list headers = scope["headers"]
        cdef bytes given = None
        cdef bint propagated = False
        for pair in headers:
            key = pair[0]
            if key == b"x-request-id":
                given = pair[1]  # the last one, as a dict of the headers would keep
            elif key in _PROPAGATED:
                propagated = True
        if given is not None and _valid_id(given):
            request.request_id = given.decode("ascii")
        else:
            request.request_id = hex128(_getrandbits(128))
        request.header = (b"x-request-id", request.request_id.encode("ascii"))
        given_method = scope["method"]
        method = given_method if given_method in _KNOWN_METHODS else "_OTHER"
        request.recorder = self
        request.send = send
        request.method = method
        request.given_method = given_method
        request.status = 500
        if self.tracing_on and scope["path"] not in UNTRACED:
            parent = _caller(headers) if propagated else None
            attributes = {
                "http.request.method": method,
                "url.path": scope["path"],
                "url.scheme": scope.get("scheme", "http"),
            }
            if method != given_method:
                attributes["http.request.method_original"] = given_method
            request.span_method = "HTTP" if method == "_OTHER" else method
            tracer = traces._tracer
            if type(tracer) is LeanTracer:
                span = (<LeanTracer>tracer).start_span(
                    request.span_method, parent, _SERVER, attributes
                )
            else:
                span = tracer.start_span(
                    request.span_method, context=parent, kind=_SERVER, attributes=attributes
                )
            request.span = span
            # On the caller's context, so its baggage goes on with the trace.
            request.span_token = attach(with_span(span, parent))
        request.notes = {}
        # The C API's calls, not the variables' methods: no method lookup per request.
        request.notes_token = PyContextVar_Set(_NOTES_VAR, request.notes)
        request.id_token = PyContextVar_Set(_REQUEST_ID_VAR, request.request_id)
        cdef Tally active
        if metrics_enabled():
            active = self._active.get(method)
            if active is None:
                active = self._active[method] = telemetry.child(
                    metrics.HTTP_ACTIVE, http_request_method=method
                )
            active.inc(1.0)
            request.active = active
        request.started_at = _monotonic()
        return request


cdef class Request:
    """One request's recording: the `send` the app gets (it notes the status and adds
    X-Request-ID), then `finish`."""

    def __init__(self, *args, **kwargs):
        raise TypeError("a Request is made by Recorder.begin")

    cdef readonly str request_id
    cdef readonly int status
    cdef readonly bint started
    cdef tuple header
    cdef Recorder recorder
    cdef object send
    cdef str method
    cdef str given_method
    cdef str span_method
    cdef object span
    cdef object span_token
    cdef dict notes
    cdef object notes_token
    cdef object id_token
    cdef Tally active
    cdef double started_at

    def __call__(self, dict message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.started = True
            headers = list(message.get("headers", ()))
            headers.append(self.header)
            message["headers"] = headers
        return self.send(message)

    def failed(self, BaseException exc):
        """An exception no handler answered: on the span, and noted if the answer had
        already begun (the status sent is then not what happened)."""
        if self.span is not None:
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        if self.started:
            self.notes["aborted"] = True

    def finish(self, dict scope):
        """Everything recorded, in the request's context: the duration, the access line,
        the span's last attributes and its end."""
        cdef double elapsed = _monotonic() - self.started_at
        cdef Recorder recorder = self.recorder
        cdef Series durations
        cdef LeanSpan lean
        cdef dict fields
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"  # never the raw path
        span = self.span
        trace_id = None
        context = None
        if span is not None:
            context = span_context_of(span)
            if field(context, IS_VALID):
                trace_id = hex128(field(context, TRACE_ID))
        if self.active is not None:
            self.active.dec(1.0)
            labels = (self.method, template, self.status)
            durations = recorder._durations.get(labels)
            if durations is None:
                durations = recorder._durations[labels] = telemetry.series(
                    metrics.HTTP_DURATION,
                    http_request_method=self.method,
                    http_route=template,
                    http_response_status_code=str(self.status),
                )
            # The exemplar: only a trace that is sampled and exported can be looked up.
            sampled = trace_id is not None and field(context, TRACE_FLAGS) & SAMPLED
            exemplar = trace_id if sampled and traces._exporting else None
            durations.observe(elapsed, exemplar)
        if recorder.access_log_on:
            # Room for the keys `_access` adds too (8), so the dict never grows.
            fields = _PyDict_NewPresized(12 + len(self.notes))
            fields["method"] = self.given_method
            fields["route"] = template
            fields["status"] = self.status
            fields["duration_ms"] = _milliseconds(elapsed)
            if self.notes:
                fields.update(self.notes)
            span_id = None if trace_id is None else field(context, SPAN_ID)
            _access(fields, self.request_id, trace_id, span_id)
        PyContextVar_Reset(_REQUEST_ID_VAR, self.id_token)
        PyContextVar_Reset(_NOTES_VAR, self.notes_token)
        if span is None:
            return
        name = f"{self.span_method} {template}"
        if type(span) is LeanSpan:
            # What update_name, set_attributes and end do, as C calls.
            lean = <LeanSpan>span
            if lean.end_time is None:
                lean.name = name
                lean.attributes["http.route"] = template
                lean.attributes["http.response.status_code"] = self.status
                if self.status >= 500:
                    lean.set_status(_ERROR)
                lean._end(None)
        else:
            span.update_name(name)
            span.set_attributes({"http.route": template, "http.response.status_code": self.status})
            if self.status >= 500:
                span.set_status(_ERROR)
            span.end()
        detach(self.span_token)

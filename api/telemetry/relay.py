"""The span relay: OTLP encoding and export in a process of its own, beside the workers.

Encoding spans as OTLP protobuf costs about 26 µs per span, on the worker's GIL, on a
thread that competes with requests: on the cached /query path that alone took 8% of
throughput (docs/BENCHMARKS.md). So a worker's batch processor hands its finished spans
to `RelaySpanExporter`, which writes them compactly (orjson, about 3 µs a span) to a Unix
socket; the relay process, started by the gunicorn master, turns them back into SDK spans
and exports them with the standard OTLP/HTTP exporter, configured by the standard
OTEL_EXPORTER_OTLP_* variables. It is the agent pattern of an OpenTelemetry Collector,
one hop earlier.

Back-pressure stays where the SDK puts it: if the relay or the collector is slow, the
worker's BatchSpanProcessor queue fills and drops spans instead of slowing requests.

Frame on the socket: 4-byte big-endian length, then JSON
`{"resource": {...}, "spans": [[name, trace_id, span_id, flags, trace_state, parent_id,
parent_remote, kind, start, end, attributes, status_code, status_description, events,
links, scope_name, scope_version], ...]}` with ids as hex.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

SOCKET_ENV = "SPAN_RELAY_SOCKET"
_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024


# --- the worker's side
def _context(ctx: SpanContext) -> list[Any]:
    return [format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), int(ctx.trace_flags)]


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    rows = []
    for span in spans:
        ctx = span.context
        assert ctx is not None
        parent = span.parent
        scope = span.instrumentation_scope
        rows.append(
            [
                span.name,
                *_context(ctx),
                ctx.trace_state.to_header() if ctx.trace_state else "",
                format(parent.span_id, "016x") if parent else None,
                bool(parent and parent.is_remote),
                span.kind.value,
                span.start_time,
                span.end_time,
                dict(span.attributes or {}),
                span.status.status_code.value,
                span.status.description,
                [[e.name, e.timestamp, dict(e.attributes or {})] for e in span.events],
                [[*_context(link.context), dict(link.attributes or {})] for link in span.links],
                scope.name if scope else "",
                scope.version if scope else None,
            ]
        )
    resource = dict(spans[0].resource.attributes) if spans else {}
    payload = orjson.dumps({"resource": resource, "spans": rows}, default=str)
    return _HEADER.pack(len(payload)) + payload


class RelaySpanExporter(SpanExporter):
    """A SpanExporter for the SDK's BatchSpanProcessor that writes to the relay's socket.
    A batch that cannot be delivered is dropped (and said so, once a minute at most). The
    relay is not restarted if it dies: tracing stops until the replica restarts, and the
    workers' logs say so. The short timeout keeps a hung relay from holding a worker's
    shutdown past gunicorn's graceful timeout."""

    def __init__(self, path: str, timeout: float = 3.0) -> None:
        self._path = path
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._warned = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        frame = encode(spans)
        for attempt in (1, 2):  # one reconnect: the connection may have gone stale
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.settimeout(self._timeout)
                    self._sock.connect(self._path)
                self._sock.sendall(frame)
                return SpanExportResult.SUCCESS
            except OSError as exc:
                self._close()
                if attempt == 2:
                    self._warn(exc, len(spans))
        return SpanExportResult.FAILURE

    def _warn(self, exc: OSError, count: int) -> None:
        if time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            import structlog

            structlog.get_logger(__name__).warning(
                "span relay unreachable, spans dropped", error=str(exc), spans=count
            )

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def shutdown(self) -> None:
        self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# --- the relay's side
def _span_context(
    trace_id: str, span_id: str, flags: int, state: str = "", remote: bool = False
) -> SpanContext:
    return SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=remote,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState.from_header([state]) if state else None,
    )


def decode(payload: bytes, limits: SpanLimits | None = None) -> list[ReadableSpan]:
    """Spans as the SDK would have finished them: attribute counts, value lengths and
    types checked here (OTEL_SPAN_ATTRIBUTE_*), not on the worker's request path."""
    limits = limits or SpanLimits()

    def bounded(
        attributes: dict[str, Any], count: int | None, length: int | None = None
    ) -> BoundedAttributes:
        length = length or limits.max_attribute_length
        return BoundedAttributes(count, attributes, immutable=True, max_value_len=length)

    message = orjson.loads(payload)
    resource = Resource(message["resource"])
    spans = []
    for (
        name,
        trace_id,
        span_id,
        flags,
        state,
        parent_id,
        parent_remote,
        kind,
        start,
        end,
        attributes,
        status_code,
        status_description,
        events,
        links,
        scope_name,
        scope_version,
    ) in message["spans"]:
        spans.append(
            ReadableSpan(
                name=name,
                context=_span_context(trace_id, span_id, flags, state),
                parent=_span_context(trace_id, parent_id, flags, remote=parent_remote)
                if parent_id
                else None,
                resource=resource,
                attributes=bounded(
                    attributes, limits.max_span_attributes, limits.max_span_attribute_length
                ),
                events=[
                    Event(e_name, bounded(e_attrs, limits.max_event_attributes), e_time)
                    for e_name, e_time, e_attrs in events
                ][: limits.max_events],
                links=[
                    Link(_span_context(t, s, f), bounded(attrs, limits.max_link_attributes))
                    for t, s, f, attrs in links
                ][: limits.max_links],
                kind=SpanKind(kind),
                status=Status(StatusCode(status_code), status_description),
                start_time=start,
                end_time=end,
                instrumentation_scope=InstrumentationScope(scope_name, scope_version),
            )
        )
    return spans


class _Connection(socketserver.BaseRequestHandler):
    server: _RelayServer

    def handle(self) -> None:
        stream = self.request.makefile("rb")
        while header := stream.read(_HEADER.size):
            (length,) = _HEADER.unpack(header)
            if length > _MAX_FRAME:
                return
            payload = stream.read(length)
            if len(payload) < length:
                return
            try:
                spans = decode(payload, self.server.limits)
            except (ValueError, TypeError, KeyError) as exc:
                print(f"span relay: bad frame dropped: {exc}", file=sys.stderr)
                continue
            with self.server.export_lock:
                self.server.exporter.export(spans)


class _RelayServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    # server_close() waits for every connection to reach EOF: a worker's last batch,
    # sent as it exits, is read and exported before the relay goes.
    daemon_threads = False
    block_on_close = True

    def __init__(self, path: str, exporter: SpanExporter) -> None:
        self.exporter = exporter
        self.export_lock = threading.Lock()
        self.limits = SpanLimits()
        super().__init__(path, _Connection)


def serve(path: str, exporter: SpanExporter | None = None) -> None:
    """Run the relay until SIGTERM or until its parent (the gunicorn master) is gone."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    parent = os.getppid()
    server = _RelayServer(path, exporter)
    os.chmod(path, 0o600)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the master, which stops us
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            break
    server.shutdown()  # no new connections
    server.server_close()  # the open ones drained to EOF (their workers have exited)
    exporter.shutdown()


class Relay:
    """The relay as a child process: started by the gunicorn master before the workers
    fork, so each worker finds SPAN_RELAY_SOCKET in its environment."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = tempfile.mkdtemp(prefix="rag-spans-", dir=base)  # mode 0700
        self.path = str(Path(self.directory, "relay.sock"))
        # Not a worker: it must not publish worker metrics into the shared directory.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        # Its own session: a supervisor stopping the master's process group must not stop
        # the relay before the workers have flushed into it. The master stops it last
        # (gunicorn's on_exit); if the master dies, the relay sees its parent gone and exits.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.telemetry.relay", self.path],
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("span relay did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])

"""The span relay: OTLP export in a process of its own, beside the workers.

Encoding spans as OTLP protobuf with the SDK costs about 26 µs per span, on the worker's
GIL, on a thread that competes with requests: on the cached /query path that alone took
8% of throughput (docs/BENCHMARKS.md). So a worker's `RelaySpanProcessor` writes each
span as it ends, compactly, and sends batches of them to a Unix socket; the relay
process, started by the gunicorn master, puts them into the very OTLP request the SDK's
exporter would have built for those spans (api/telemetry/otlp.py, tested against the
SDK's encoder) and posts it with that exporter's HTTP client, configured by the standard
OTEL_EXPORTER_OTLP_* variables. It is the agent pattern of an OpenTelemetry Collector,
one hop earlier.

How a span is written (api/telemetry/wire.pyx): our own spans, the common case, as the
OTLP Span message itself, in C (~3,000 instructions); the rest (events, links, values
out of the ordinary, spans over the limits, another tracer's spans) as a JSON row, which
the relay writes as OTLP (~6 µs a span). The relay shares the machine's cores with the
workers, so its cost is the service's cost too.

Back-pressure stays where the SDK puts it: if the relay is slow, the worker's queue fills
and drops spans instead of slowing requests. The relay reads every frame as it comes and
queues it for one exporter thread; if the collector is slow or away, that queue stops at
SPAN_RELAY_MAX_QUEUED_BYTES (64 MiB) and the newest frames are dropped.

A frame on the socket, all lengths 4-byte big-endian:

    length, head length, head: JSON {"resource": {...}, "resource_schema_url": ""}
    then records, each: length, then
      "P", scope length, scope: JSON [name, version, schema_url, attributes],
           an OTLP Span message
    or
      "J", a JSON row: [name, trace_id, span_id, flags, trace_state, parent_id,
           parent_remote, kind, start, end, attributes, status_code, status_description,
           events, links, scope_name, scope_version, scope_schema_url, scope_attributes]
           with ids as hex and bytes values tagged.

The workers and the relay are one installation, started together: the format needs no
version of its own.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import math
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
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.environment_variables import (
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    OTEL_BSP_MAX_QUEUE_SIZE,
    OTEL_BSP_SCHEDULE_DELAY,
)
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.trace import SpanContext

from api import processes
from api.telemetry.otlp import BYTES_TAG, FLOAT_TAG, Written, encode_request
from api.telemetry.spans import LeanSpan, plain
from api.telemetry.wire import SpanRows

SOCKET_ENV = "SPAN_RELAY_SOCKET"
_HEADER = struct.Struct(">I")
_DOUBLE, _DOUBLE_BITS = struct.Struct("<d"), struct.Struct("<Q")
_WRITTEN, _ROW = b"P"[0], b"J"[0]  # a span record's kinds
_MAX_FRAME = 64 * 1024 * 1024


# --- the worker's side


def _context(ctx: SpanContext) -> list[Any]:
    return [format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), int(ctx.trace_flags)]


def _json(value: Any) -> Any:
    """What orjson cannot write: bytes (tagged, restored by the relay) and other objects,
    which become their str() as the SDK makes them, or null if they have none."""
    if isinstance(value, bytes | bytearray):
        return {BYTES_TAG: base64.b64encode(value).decode()}
    if type(value).__str__ is object.__str__:  # type: ignore[comparison-overlap]
        return None
    return str(value)


def span_queue(max_queue: int, batch: int, wake: threading.Event) -> SpanRows:
    """The worker's span queue (api/telemetry/wire.pyx), writing each span's record as it
    ends: as OTLP where it can, as its row (`encode_row`) otherwise, under the span limits
    the relay reads from the same environment. `wake` is set when `batch` records wait."""
    return SpanRows(
        max_queue,
        batch,
        wake,
        encode_row,
        encode_resource,
        encode_scope,
        SpanLimits(),
    )


def encode_row(span: ReadableSpan | LeanSpan) -> bytes:
    """A span's row record, as JSON: done as the span ends, so what waits for the relay is
    bytes, which the garbage collector never walks (a queue of live spans cost a busy
    worker ~6 µs a request in collections, docs/BENCHMARKS.md)."""
    row = span.row() if isinstance(span, LeanSpan) else _row(span)
    row[10] = _exact_floats(row[10])
    for event in row[13]:
        event[2] = _exact_floats(event[2])
    for link in row[14]:
        link[3] = _exact_floats(link[3])
    try:
        data = _dumps(row)
    except TypeError:  # an integer beyond 64 bits or a lone surrogate: OTLP cannot carry
        _drop_unwritable(row)  # either, and the SDK's encoder loses its whole batch
        data = _dumps(row)
    return _HEADER.pack(len(data) + 1) + b"J" + data


def _scope_row(scope: Any) -> list[Any]:
    if scope is None:
        return ["", None, "", {}]
    return [scope.name, scope.version, scope.schema_url, plain(scope.attributes)]


def _row(span: ReadableSpan | LeanSpan) -> list[Any]:
    ctx = span.context
    assert ctx is not None
    parent = span.parent
    status = span.status
    return [
        span.name,
        format(ctx.trace_id, "032x"),
        format(ctx.span_id, "016x"),
        ctx.trace_flags,  # an int
        ctx.trace_state.to_header() if ctx.trace_state else "",
        format(parent.span_id, "016x") if parent else None,
        bool(parent and parent.is_remote),
        span.kind._value_,  # the member's value without Enum's descriptor
        span.start_time,
        span.end_time,
        plain(span.attributes),
        status.status_code._value_,
        status.description,
        [[e.name, e.timestamp, plain(e.attributes)] for e in span.events] if span.events else [],
        [
            [*_context(link.context), plain(link.attributes), link.context.is_remote]
            for link in span.links
        ]
        if span.links
        else [],
        *_scope_row(span.instrumentation_scope),
    ]


def encode_resource(resource: SdkResource | None) -> bytes:
    """The frame's head: the resource the spans share (one per provider)."""
    attributes = _dumps(_exact_floats(_fits_only(dict(resource.attributes) if resource else {})))
    schema_url = _dumps(resource.schema_url if resource else "")
    head = b'{"resource":' + attributes + b',"resource_schema_url":' + schema_url + b"}"
    return _HEADER.pack(len(head)) + head


def encode_scope(scope_row: Sequence[Any]) -> bytes:
    """A scope's row, as the JSON a worker-written span's record carries (once per tracer).
    Its attributes are cut to what OTLP can carry, as a row's would be."""
    name, version, schema_url, attributes = scope_row
    return _dumps([name, version, schema_url, _exact_floats(_fits_only(plain(attributes)))])


def frame(resource: bytes, records: Sequence[bytes]) -> bytes:
    # One copy of a batch (~128 KB), where joining, prefixing and heading took three.
    size = len(resource) + sum(map(len, records))
    return b"".join((_HEADER.pack(size), resource, *records))


def _exact_float(value: Any) -> Any:
    """A float as the row must carry it to arrive as the double the SDK's encoder (and
    wire.pyx) writes: orjson writes NaN and infinities as null, and a float subclass
    (numpy's) through `default`, as text."""
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {FLOAT_TAG: _DOUBLE_BITS.unpack(_DOUBLE.pack(value))[0]}
    if isinstance(value, list | tuple):
        return [_exact_float(item) for item in value]
    return value


def _exact_floats(attributes: Any) -> Any:
    """`attributes` with its floats made exact, copied only if one needed it (the dict may
    be a live span's)."""
    if not any(isinstance(v, float | list | tuple) for v in attributes.values()):
        return attributes
    return {key: _exact_float(value) for key, value in attributes.items()}


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_json, option=orjson.OPT_NON_STR_KEYS)


def _fits(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return bool(-(2**63) <= value < 2**64)
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
    if isinstance(value, list | tuple):
        return all(_fits(v) for v in value)
    if isinstance(value, dict):
        return all(_fits(v) for v in value.values())
    return True


def _fits_only(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if _fits(k) and _fits(v)}


def _drop_unwritable(row: list[Any]) -> None:
    """Drop the attributes holding an integer beyond 64 bits (the SDK's encoder loses such
    a key alone) or a string, or a key, that is not valid Unicode: the key, rather than
    the span."""
    row[10] = _fits_only(row[10])
    for event in row[13]:
        event[2] = _fits_only(event[2])
    for link in row[14]:
        link[3] = _fits_only(link[3])
    row[18] = _fits_only(row[18])


class RelaySpanProcessor(SpanProcessor):
    """The worker's span processor when the relay runs: the SDK's BatchSpanProcessor
    semantics (OTEL_BSP_SCHEDULE_DELAY, _MAX_QUEUE_SIZE, _MAX_EXPORT_BATCH_SIZE; a full
    queue drops spans rather than slowing requests), but a span is encoded as it ends
    and its thread only sends bytes to the relay's socket.

    A batch that cannot be delivered is dropped, and so is what is left to send with it
    (and said so, once a minute at most per cause). If the relay dies, the master starts
    it again on the same path (`Relay`) and the next send reconnects. Flushing and
    shutting down keep to one deadline (`timeout`), so a hung relay cannot hold a
    worker's shutdown past gunicorn's graceful timeout."""

    def __init__(self, path: str, timeout: float = 3.0) -> None:
        self._path = path
        self._timeout = timeout
        self._delay = _setting(OTEL_BSP_SCHEDULE_DELAY, 5000) / 1000
        self._max_queue = _setting(OTEL_BSP_MAX_QUEUE_SIZE, 2048)
        self._batch = min(_setting(OTEL_BSP_MAX_EXPORT_BATCH_SIZE, 512), self._max_queue)
        self._warned: dict[str, float] = {}
        self._stopped = False
        self._start()
        if hasattr(os, "register_at_fork"):  # a child forked later starts afresh
            restart = weakref.WeakMethod(self._start)
            os.register_at_fork(after_in_child=lambda: (method := restart()) and method())

    def _start(self) -> None:
        self._send_lock = threading.Lock()  # the socket, and the order of frames
        self._wake = threading.Event()
        self._queue = span_queue(self._max_queue, self._batch, self._wake)
        self._queue.stopped = self._stopped  # a child forked after shutdown queues nothing
        # The compiled queue's put itself: no Python frame per span.
        self.on_end = self._queue.put  # type: ignore[method-assign]
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="span-relay-sender", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._delay)
            self._wake.clear()
            if self._stopped:
                break
            try:
                # No overall deadline here: a slow relay slows this thread, and the queue
                # (bounded) drops what does not fit meanwhile.
                self._send_all(None)
            except Exception as exc:  # the thread must outlive any one batch
                with contextlib.suppress(OSError):
                    os.write(2, f"span sender: {exc!r}\n".encode())

    def _send_all(self, deadline: float | None) -> bool:
        """Everything queued, in batches; with a `deadline` (flush, shutdown), nothing is
        waited for beyond it. The first batch that cannot be sent drops the rest."""
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._send_lock.acquire(timeout=wait):
            return False
        try:
            rows, dropped = self._queue.take()
            if dropped:
                self._warn("span queue full or span unwritable, spans dropped", dropped)
            for i in range(0, len(rows), self._batch):
                batch = rows[i : i + self._batch]
                assert self._queue.resource is not None  # set by the first span
                if not self._send(frame(self._queue.resource, batch), deadline):
                    self._warn("span relay unreachable or too slow, spans dropped", len(rows) - i)
                    return False
            return True
        finally:
            self._send_lock.release()

    def _send(self, data: bytes, deadline: float | None) -> bool:
        for attempt in (1, 2):  # one reconnect: the connection may have gone stale
            timeout = self._timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0 or (attempt == 2 and timeout < self._timeout / 2):
                    return False
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.settimeout(timeout)
                    self._sock.connect(self._path)
                self._sock.settimeout(timeout)
                self._sock.sendall(data)
                return True
            except OSError:
                self._close()
        return False

    def _warn(self, event: str, count: int) -> None:
        if time.monotonic() - self._warned.get(event, -60.0) > 60:
            self._warned[event] = time.monotonic()
            import structlog

            structlog.get_logger(__name__).warning(event, spans=count)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._send_all(time.monotonic() + min(timeout_millis / 1000, self._timeout))

    def shutdown(self) -> None:
        if self._stopped:
            return
        deadline = time.monotonic() + self._timeout
        self._stopped = self._queue.stopped = True
        self._wake.set()
        self._thread.join(timeout=self._timeout)
        self._send_all(deadline)
        if self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._close()
            self._send_lock.release()


def _setting(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


# --- the relay's side
def to_otlp(payload: bytes, limits: SpanLimits | None = None) -> bytes:
    """A frame's spans as the serialised OTLP request the SDK's exporter would have sent
    for them (api/telemetry/otlp.py). A frame that is cut short or holds a record of an
    unknown kind raises (the relay drops that frame alone)."""
    view = memoryview(payload)
    (size,) = _HEADER.unpack_from(payload)
    at = _HEADER.size + size
    message = orjson.loads(view[_HEADER.size : at])
    spans: list[Any] = []
    scopes: dict[bytes, list[Any]] = {}  # each scope's JSON, read once a frame
    while at < len(payload):
        (size,) = _HEADER.unpack_from(payload, at)
        start, at = at + _HEADER.size, at + _HEADER.size + size
        if at > len(payload) or size < 1 or (payload[start] == _WRITTEN and size < 5):
            raise ValueError("a span record runs past the end of its frame")
        kind = payload[start]
        if kind == _WRITTEN:
            (scope_size,) = _HEADER.unpack_from(payload, start + 1)
            scope_at = start + 1 + _HEADER.size
            if scope_at + scope_size > at:
                raise ValueError("a span record's scope runs past the end of its record")
            scope = payload[scope_at : scope_at + scope_size]
            if scope not in scopes:
                scopes[scope] = orjson.loads(scope)
            spans.append(Written(scopes[scope], payload[scope_at + scope_size : at]))
        elif kind == _ROW:
            spans.append(orjson.loads(view[start + 1 : at]))
        else:
            raise ValueError(f"unknown span record {kind:#x}")
    message["spans"] = spans
    return encode_request(message, limits)


class OtlpSender:
    """Posts encoded OTLP requests with the SDK exporter's own client: endpoint, headers,
    timeout, compression and retries as OTEL_EXPORTER_OTLP_* configure them, over one
    kept-alive connection to a plain-HTTP collector (api/telemetry/transport.py) and the
    exporter's own transport otherwise. (`_client` and `_resolve_endpoint` are private to
    the exporter; the version is pinned and the relay's tests send through it to real
    receivers.)"""

    def __init__(self) -> None:
        from opentelemetry.exporter.otlp.proto.http._common import _resolve_endpoint
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_OTLP_TRACES_ENDPOINT

        from api.telemetry.transport import lean_transport

        endpoint = _resolve_endpoint(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "v1/traces")
        self.transport = lean_transport(endpoint)
        self._exporter = (
            OTLPSpanExporter(endpoint, _transport=self.transport)
            if self.transport is not None
            else OTLPSpanExporter(endpoint)
        )

    def send(self, request: bytes) -> bool:
        return bool(self._exporter._client.export(request).success)

    def shutdown(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]


class _Connection(socketserver.BaseRequestHandler):
    """Reads a worker's frames as fast as they come and queues them for the exporter: a
    worker's send never waits on the collector."""

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
            self.server.queue(payload)


class _RelayServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Frames wait for one exporter thread in a queue of at most `max_bytes`; past that a
    slow or absent collector costs the newest frames (said on stderr, once a minute at
    most), never memory or threads without bound."""

    # server_close() waits for every connection to reach EOF: a worker's last batch,
    # sent as it exits, is read and queued before the relay drains and goes.
    daemon_threads = False
    block_on_close = True

    def __init__(self, path: str, sender: OtlpSender, max_bytes: int) -> None:
        self.sender = sender
        self.limits = SpanLimits()
        self._max_bytes = max_bytes
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in _frames
        self._ready = threading.Condition()
        self._closing = False
        self._dropped = 0
        self._warned = -60.0
        self._exporter = threading.Thread(target=self._export, name="exporter", daemon=True)
        self._exporter.start()
        super().__init__(path, _Connection)

    def queue(self, payload: bytes) -> None:
        with self._ready:
            if self._queued + len(payload) > self._max_bytes:
                self._dropped += 1
                dropped = self._dropped
                if time.monotonic() - self._warned > 60:
                    self._warned = time.monotonic()
                    print(
                        f"span relay: the collector is too slow or away; {dropped} frames of "
                        f"spans dropped so far ({self._max_bytes} bytes wait at most)",
                        file=sys.stderr,
                    )
                return
            self._frames.append(payload)
            self._queued += len(payload)
            self._ready.notify()

    def _export(self) -> None:
        while True:
            with self._ready:
                while not self._frames and not self._closing:
                    self._ready.wait()
                if not self._frames:
                    return  # closing, and all sent
                payload = self._frames.popleft()
                self._queued -= len(payload)
            try:
                request = to_otlp(payload, self.limits)
            except Exception as exc:  # a span it cannot write (a float clock reading...)
                # loses its frame, not the frames after it.
                print(f"span relay: bad frame dropped: {exc!r}", file=sys.stderr)
                continue
            try:
                self.sender.send(request)
            except Exception as exc:  # the thread must outlive any one request
                print(f"span relay: export failed: {exc!r}", file=sys.stderr)

    def drain(self, timeout: float) -> None:
        """Send what is queued, for `timeout` seconds at most."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        self._exporter.join(timeout)


MAX_QUEUED_ENV = "SPAN_RELAY_MAX_QUEUED_BYTES"
DRAIN_SECONDS = 10  # within Relay.stop's 15 s before SIGKILL


def serve(path: str, parent: int) -> None:
    """Run the relay until SIGTERM or until `parent` (the gunicorn master, which passes its
    pid: it may die while this process is still importing) is no longer its parent."""
    # Background work: where it shares a core with a worker, the request goes first. The
    # scheduler tends to wake the relay on the core of the worker that just wrote to it.
    os.nice(10)
    sender = OtlpSender()
    server = _RelayServer(path, sender, _setting(MAX_QUEUED_ENV, 64 * 1024 * 1024))
    os.chmod(path, 0o600)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the master, which stops us
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            break
    server.shutdown()  # no new connections
    server.server_close()  # the open ones read to EOF (their workers have exited)
    server.drain(DRAIN_SECONDS)
    sender.shutdown()


# Held while the master's watcher thread starts a relay or logs, and by every fork of the
# process (gunicorn forks its workers without exec): a worker forked mid-Popen would hold
# Popen's error pipe open (and Popen would wait for that worker to exit), one forked
# mid-write would inherit a held stderr lock.
_forking = threading.Lock()


# Functions, not the lock's bound methods: a child replaces the lock. Popen does not run
# these hooks (it runs no Python between fork and exec), so holding the lock around it is
# safe.
def _before_fork() -> None:
    _forking.acquire()


def _after_fork_in_parent() -> None:
    _forking.release()


def _after_fork_in_child() -> None:
    global _forking
    _forking = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


class Relay:
    """The relay as a child process: started by the gunicorn master before the workers
    fork, so each worker finds SPAN_RELAY_SOCKET in its environment. If it dies, a thread
    in the master starts it again on the same socket path, and the workers' next send
    reconnects: the spans queued meanwhile are dropped by the workers' own rules, not the
    tracing of the replica for the rest of its life. A relay that dies again soon is
    started again later and later (up to a minute), so a crash loop does not spin."""

    RESTART_DELAY = 1.0  # seconds, doubled up to MAX_DELAY while restarts fail or die young
    MAX_DELAY = 60.0

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = tempfile.mkdtemp(prefix="rag-spans-", dir=base)  # mode 0700
        self.path = str(Path(self.directory, "relay.sock"))
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the process: started by the watcher or stopped
        try:
            self.process = self._spawn()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._started = time.monotonic()
        threading.Thread(target=self._watch, name="span-relay-watcher", daemon=True).start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a killed relay leaves its socket behind
        # Not a worker: it must not publish worker metrics into the shared directory.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        # Its own session: a supervisor stopping the master's process group must not stop
        # the relay before the workers have flushed into it. The master stops it last
        # (gunicorn's on_exit); if the master dies, the relay sees its parent gone and exits.
        with _forking:
            process = subprocess.Popen(
                [sys.executable, "-m", "api.telemetry.relay", self.path, str(os.getpid())],
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            if process.poll() is not None or time.monotonic() > deadline or self._stopping.is_set():
                processes.stop(process, timeout=15)
                raise RuntimeError("span relay did not start")
            time.sleep(0.05)
        return process

    def _watch(self) -> None:
        delay = self.RESTART_DELAY
        died = True  # the process in hand has died (not: failed to start)
        while True:
            code = self.process.wait()
            if self._stopping.is_set():  # stopped on purpose: nothing to say or restart
                return
            if died:
                # A young death counts as a failed start: the delay keeps growing.
                lived = time.monotonic() - self._started
                delay = self.RESTART_DELAY if lived > self.MAX_DELAY else delay
                # 0 can also mean gunicorn's SIGCHLD handler reaped it first.
                self._log(f"span relay exited (code {code}): starting it again in {delay:.0f} s")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self.process = self._spawn()
                except Exception as exc:  # no file descriptors, no interpreter...: try later
                    delay = min(delay * 2, self.MAX_DELAY)
                    self._log(f"span relay did not start ({exc}): next try in {delay:.0f} s")
                    died = False
                    continue
                self._started = time.monotonic()
                self.restarts += 1
                delay = min(delay * 2, self.MAX_DELAY)  # for a next death, if it is young
                died = True

    @staticmethod
    def _log(message: str) -> None:
        with _forking:
            logging.getLogger(__name__).error(message)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            processes.stop(self.process, timeout=15)
        shutil.rmtree(self.directory, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))

"""Log lines: the access line's own renderer against structlog's, and the buffer that
keeps one write per request off the request path."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

from api.middleware import RequestTelemetry
from api.telemetry import flusher, logs, recording, traces
from api.telemetry.spans import LeanTracerProvider
from tests.servers import ROOT, wait_until


class _Stderr:
    """What reached stderr so far, line by line."""

    def __init__(self, capture: pytest.CaptureFixture[bytes]) -> None:
        self._capture = capture
        self._seen: list[dict[str, Any]] = []

    def lines(self) -> list[dict[str, Any]]:
        err = self._capture.readouterr().err
        self._seen += [json.loads(line) for line in err.splitlines()]
        return self._seen


@pytest.fixture
def stderr(capsysbinary: pytest.CaptureFixture[bytes]) -> Iterator[_Stderr]:
    yield _Stderr(capsysbinary)
    logs.configure_logging("info", "json")  # unbuffered again, for the tests after


@pytest.mark.parametrize("traced", [True, False])
def test_the_access_line_is_what_structlog_writes(stderr: _Stderr, traced: bool) -> None:
    logs.configure_logging("info", "json")
    fields = {
        "method": "POST",
        "route": "/query",
        "status": 200,
        "duration_ms": 2.31,
        "cached": True,
        "generator": "extractive",
        "odd": {1, 2},  # not JSON: both write its str()
    }
    span = (
        trace.NonRecordingSpan(SpanContext(0xABC, 0xDEF, False, TraceFlags(TraceFlags.SAMPLED)))
        if traced
        else None
    )
    token = otel_context.attach(trace.set_span_in_context(span)) if span else None
    structlog.contextvars.bind_contextvars(request_id="req-1")
    try:
        structlog.get_logger("api.access").info("request", **fields)
        recording.access(dict(fields), "req-1", span.get_span_context() if span else None)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
        if token is not None:
            otel_context.detach(token)
    reference, ours = stderr.lines()
    assert list(ours) == list(reference)  # the same keys in the same order
    written = [datetime.fromisoformat(x.pop("timestamp")) for x in (reference, ours)]
    assert abs((written[1] - written[0]).total_seconds()) < 1
    assert ours == reference
    assert ("trace_id" in ours) is traced and ours["request_id"] == "req-1"


def test_the_access_line_follows_the_level(stderr: _Stderr) -> None:
    logs.configure_logging("warning", "json")
    recording.access({"status": 200}, "req-2", None)
    assert stderr.lines() == []


def test_info_lines_wait_and_a_warning_takes_them_along_in_order(stderr: _Stderr) -> None:
    lines = logs._Lines()  # not the process's: no flusher thread writes this one
    lines.buffered = True
    lines.add(b'{"event": "first"}\n', urgent=False)
    lines.add(b'{"event": "request"}\n', urgent=False)
    assert stderr.lines() == []  # waiting for the flusher
    lines.add(b'{"event": "second"}\n', urgent=True)
    assert [line["event"] for line in stderr.lines()] == ["first", "request", "second"]
    lines.add(b'{"event": "third"}\n', urgent=False)
    lines.flush()
    assert [line["event"] for line in stderr.lines()][-1] == "third"


def test_library_lines_keep_their_place_among_ours(stderr: _Stderr) -> None:
    logs.configure_logging("info", "json", buffered=True)
    structlog.get_logger("t").info("ours")
    logging.getLogger("some.library").warning("theirs")  # a warning: written at once
    assert [line["event"] for line in stderr.lines()] == ["ours", "theirs"]


def test_a_flush_is_cut_at_line_ends_into_pipe_sized_writes() -> None:
    lines = [b"x" * 1000 + b"\n"] * 9 + [b"y" * (2 * select.PIPE_BUF) + b"\n"]
    chunks = list(logs._chunks(lines))
    assert b"".join(chunks) == b"".join(lines)
    assert all(chunk.endswith(b"\n") for chunk in chunks)
    assert all(len(chunk) <= select.PIPE_BUF for chunk in chunks[:-1])
    assert chunks[-1] == lines[-1]  # a line longer than that goes whole, alone


def test_the_flusher_writes_waiting_lines_within_a_tick(stderr: _Stderr) -> None:
    logs.configure_logging("info", "json", buffered=True)
    flusher.start()
    structlog.get_logger("t").info("soon")
    # No flush is called here: the flusher's thread writes it (a tick is 0.1 s).
    wait_until(lambda: [line["event"] for line in stderr.lines()] == ["soon"], 5, "the line")


def test_many_lines_do_not_wait_for_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private buffer, out of the flusher's reach: only the count can write it."""
    stream = _Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    lines = logs._Lines()
    lines.buffered = True
    for i in range(lines.MAX - 1):
        lines.add(b'{"i": %d}\n' % i, urgent=False)
    assert stream.data == b""  # waiting for the clock
    lines.add(b'{"i": %d}\n' % (lines.MAX - 1), urgent=False)
    assert [json.loads(x)["i"] for x in stream.data.splitlines()] == list(range(lines.MAX))


def test_lines_added_without_a_lock_while_another_thread_writes_are_all_written_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The queue takes a line without a lock (the access line's way in). Four threads
    add while the main thread keeps writing the queue out: every line comes out once,
    and each thread's in the order it added them."""
    stream = _Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    lines = logs._Lines()
    lines.buffered = True
    count = 100_000
    done = threading.Event()

    def add(thread: int) -> None:
        for i in range(count):
            if lines.queue.add(b"%d %d\n" % (thread, i), False):
                lines.flush()

    def join_all() -> None:
        for thread in threads:
            thread.join()
        done.set()

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    threading.Thread(target=join_all).start()
    while not done.is_set():
        lines.flush()
    lines.flush()
    seen: dict[int, list[int]] = {n: [] for n in range(4)}
    for line in stream.data.splitlines():
        adder, i = map(int, line.split())
        seen[adder].append(i)
    assert seen == {n: list(range(count)) for n in range(4)}


class _Stream:
    """A stderr whose writes can be short, fail, or log a line of their own."""

    def __init__(self, take: int | None = None, fail: bool = False) -> None:
        self.data = bytearray()
        self.take, self.fail = take, fail
        self.during_write: Any = None

    @property
    def buffer(self) -> _Stream:
        return self

    def write(self, data: memoryview) -> int:
        if self.fail:
            raise BrokenPipeError("the reader is gone")
        if self.during_write is not None:
            action, self.during_write = self.during_write, None
            action()
        part = bytes(data[: self.take or len(data)])
        self.data += part
        return len(part)

    def flush(self) -> None:
        pass


def test_a_raw_stream_taking_part_of_a_write_gets_the_rest(monkeypatch: pytest.MonkeyPatch):
    stream = _Stream(take=7)  # as a raw FileIO on a busy pipe may
    monkeypatch.setattr(sys, "stderr", stream)
    lines = logs._Lines()
    for i in range(50):
        lines.add(b'{"i": %d}\n' % i, urgent=False)
    assert [json.loads(x)["i"] for x in stream.data.splitlines()] == list(range(50))


def test_a_broken_stderr_loses_lines_but_raises_into_no_one(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "stderr", _Stream(fail=True))
    lines = logs._Lines()
    lines.add(b'{"event": "lost"}\n', urgent=True)  # no exception reaches the caller
    lines.flush()


def test_a_line_logged_while_writing_does_not_deadlock(monkeypatch: pytest.MonkeyPatch):
    """As when the garbage collector frees an unread Future mid-write and asyncio logs it."""
    stream = _Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    lines = logs._Lines()
    stream.during_write = lambda: lines.add(b'{"event": "nested"}\n', urgent=True)
    done = threading.Event()

    def write() -> None:
        lines.add(b'{"event": "outer"}\n', urgent=True)
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(5), "the writing thread deadlocked on its own lock"
    assert sorted(json.loads(x)["event"] for x in stream.data.splitlines()) == ["nested", "outer"]


def test_a_library_line_from_inside_a_write_does_not_deadlock_another_thread(
    monkeypatch: pytest.MonkeyPatch,
):
    """Thread A writes the waiting lines out, and its garbage collection logs through
    stdlib logging (asyncio's unread Future errors do); thread B is logging through the
    same handler meanwhile. With a lock of the handler's own besides the lines' lock, B
    held the handler's and waited for the lines', A the other way round: both for good."""
    stream = _Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(logs.LINES, "buffered", False)
    library = logging.getLogger("tests.library")
    handler = logs.LinesHandler()
    handler.setFormatter(logging.Formatter('{"event": "%(message)s"}'))
    monkeypatch.setattr(library, "handlers", [handler])
    monkeypatch.setattr(library, "propagate", False)
    writing, b_started = threading.Event(), threading.Event()

    def collected_mid_write() -> None:
        stream.during_write = lambda: None  # once
        writing.set()
        b_started.wait(5)
        time.sleep(0.3)  # B is in the handler by now, waiting for the lines' lock
        library.error("from the garbage collector")

    stream.during_write = collected_mid_write
    a = threading.Thread(target=logs.LINES.add, args=(b'{"event": "A"}\n', True), daemon=True)
    b = threading.Thread(target=library.warning, args=("B",), daemon=True)
    a.start()
    assert writing.wait(5)
    b.start()
    b_started.set()
    a.join(5)
    b.join(5)
    assert not a.is_alive() and not b.is_alive(), "the two threads deadlocked"
    events = sorted(json.loads(x)["event"] for x in stream.data.splitlines())
    assert events == ["A", "B", "from the garbage collector"]


def _boom() -> None:
    raise RuntimeError("a bug no handler knows")


def test_an_unhandled_error_is_a_500_that_keeps_its_request_id(capsysbinary, make_client):
    """Answered inside the request: the response echoes the id, and the error's line
    carries it (Starlette's outermost handler would answer after both were gone)."""
    with make_client(log_format="json") as client:
        client.app.add_api_route("/boom", _boom)
        response = client.get("/boom", headers={"x-request-id": "req-boom"})
        assert response.status_code == 500
        assert response.json() == {"detail": "internal error"}  # nothing of the bug
        assert response.headers["x-request-id"] == "req-boom"
        flusher.flush()
        metrics_text = client.get("/metrics").text
    # Earlier tests may leave console-format lines behind in the buffer: JSON lines only.
    written = capsysbinary.readouterr().err.splitlines()
    records = [json.loads(line) for line in written if line.startswith(b"{")]
    lines = [line for line in records if line.get("request_id") == "req-boom"]
    error = next(line for line in lines if line["event"] == "unhandled error")
    assert error["level"] == "error" and "a bug no handler knows" in error["exception"]
    access = next(line for line in lines if line["event"] == "request")
    assert access["status"] == 500 and access["route"] == "/boom"
    assert 'rag_errors_total{type="internal"} 1.0' in metrics_text


def _traced_into_memory(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Spans of the service's tracer kept in memory, and JSON log lines."""
    memory = InMemorySpanExporter()
    provider = LeanTracerProvider(Resource({}), TracerProvider(shutdown_on_exit=False).sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(traces, "_tracer", provider.get_tracer("api"))
    logs.configure_logging("info", "json")
    return memory


def _get_once(app: Any, path: str) -> list[dict[str, Any]]:
    """The messages `app` sends, behind RequestTelemetry, for one GET of `path`."""
    sent: list[dict[str, Any]] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "scheme": "http"}
    asyncio.run(RequestTelemetry(app, tracing_on=True)(scope, receive, send))
    return sent


def test_an_unhandled_error_is_recorded_on_the_server_span(stderr: _Stderr, monkeypatch):
    async def app(scope, receive, send):  # an application with a bug in it
        _boom()

    memory = _traced_into_memory(monkeypatch)
    sent = _get_once(app, "/boom")
    assert sent[0]["status"] == 500
    (span,) = memory.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR
    (event,) = span.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.message"] == "a bug no handler knows"
    error = next(line for line in stderr.lines() if line["event"] == "unhandled error")
    assert error["trace_id"] == format(span.context.trace_id, "032x")
    assert error["span_id"] == format(span.context.span_id, "016x")


def test_an_error_after_the_response_began_is_not_recorded_as_a_success(
    stderr: _Stderr, monkeypatch
):
    """The 200 has gone out and the body breaks off (a stream's bug): the connection is
    cut, the span says error and the access line says aborted, beside the status sent."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        _boom()

    memory = _traced_into_memory(monkeypatch)
    with pytest.raises(RuntimeError):  # the server cuts the connection
        _get_once(app, "/stream")
    (span,) = memory.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR
    access = next(line for line in stderr.lines() if line["event"] == "request")
    assert access["status"] == 200 and access["aborted"] is True


def test_a_failure_of_the_request_telemetry_itself_is_still_a_json_500(make_client, monkeypatch):
    def broken(_: int) -> int:
        raise RuntimeError("the telemetry broke")

    with make_client() as client:
        monkeypatch.setattr("api.telemetry.recording._getrandbits", broken)
        # As a server sees it: the exception goes on to the server after the answer.
        response = TestClient(client.app, raise_server_exceptions=False).get("/health")
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}


WRITER = """
import sys
import structlog
from api.telemetry import logs

logs.configure_logging("info", "json", buffered=True)
log = structlog.get_logger("writer")
for n in range(int(sys.argv[1])):
    log.info("long", n=n, payload="x" * 9000)  # past PIPE_BUF: a traceback's size
    if n % 8 == 7:
        logs.LINES.flush()
logs.LINES.flush()
"""


def test_long_lines_from_several_processes_on_one_pipe_stay_whole() -> None:
    """A replica's workers share one pipe to the supervisor; a write past PIPE_BUF can be
    cut into by another writer once the pipe is full. Each line must still parse."""
    processes, lines_each = 4, 120
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(lines_each)],
            stderr=write_end,
            cwd=ROOT,
        )
        for _ in range(processes)
    ]
    os.close(write_end)
    received = bytearray()
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        # A slow reader, as a busy supervisor is: the pipe fills and writers wait in it.
        while chunk := pipe.read(4096):
            received += chunk
            time.sleep(0.0005)
    for writer in writers:
        assert writer.wait(60) == 0
    lines = bytes(received).splitlines()
    parsed = [json.loads(line) for line in lines]  # fails on a line cut into by another
    assert len(parsed) == processes * lines_each
    assert all(len(line["payload"]) == 9000 for line in parsed)


def test_the_pipe_lock_is_held_once_per_write_and_never_for_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "wb", buffering=0)
    # Another open description of the same pipe: what another worker's lock would use.
    other = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY)
    lock = logs._PipeLock()
    try:
        with lock.held(stream):
            with lock.held(stream):  # a line logged while writing (the same thread)
                pass
            with pytest.raises(BlockingIOError):  # the inner write did not free the outer's
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the write is done

        # A holder that keeps it (a sibling stopped mid-write) delays lines, not forever.
        monkeypatch.setattr(logs._PipeLock, "WAIT_S", 0.2)
        started = time.monotonic()
        with lock.held(stream):
            waited = time.monotonic() - started
        assert 0.2 <= waited < 5
        fcntl.flock(other, fcntl.LOCK_UN)

        # A child forked while the parent holds it keeps no descriptor of the parent's:
        # one would hold the lock for the child's whole life if the parent died.
        process_lock = logs.LINES._pipe  # the one the fork hook resets
        with process_lock.held(stream):
            parents = process_lock._fd
            assert parents >= 0
            pid = os.fork()
            if pid == 0:
                try:
                    os.fstat(parents)  # still open in the child: the defect
                    os._exit(1)
                except OSError:
                    os._exit(0 if process_lock._fd == -1 else 2)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(other)
        stream.close()
        os.close(read_end)

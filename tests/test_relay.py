"""The span relay hands spans from a worker to a separate exporting process: what comes out
of it must be, byte for byte, the OTLP the worker would have sent itself."""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AnyValue

from api.telemetry import otlp, relay
from api.telemetry.otlp import BYTES_TAG
from api.telemetry.spans import LeanSpan, LeanTracerProvider
from tests.otlp import OtlpReceiver, records, relay_frame, relayed, same
from tests.servers import ApiServer, wait_until


@pytest.fixture(autouse=True)
def _sdk_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")  # conftest turns it off for apps


def _spans(lean: bool = False) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider: TracerProvider | LeanTracerProvider = (
        LeanTracerProvider(Resource.create({"service.name": "t"}), TracerProvider().sampler)
        if lean
        else TracerProvider()
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("api", "9.9")
    caller = TraceContextTextMapPropagator().extract(
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=opaque",
        }
    )
    attributes: dict[str, AnyValue] = {
        "http.route": "/query",
        "rag.top_k": 3,
        "tags": ("a", "b"),
        "ok": True,
    }
    with (
        tracer.start_as_current_span(
            "POST /query", context=caller, kind=SpanKind.SERVER, attributes=attributes
        ) as server,
        tracer.start_as_current_span("generate", attributes={"rag.temperature": 0.7}) as gen,
    ):
        gen.record_exception(ValueError("boom"))
        gen.set_status(Status(StatusCode.ERROR, "boom"))
        gen.add_link(server.get_span_context(), {"why": "test"})
    return list(memory.get_finished_spans())


def test_the_relay_sends_exactly_the_otlp_the_sdk_would():
    spans = _spans()
    frame = relay_frame(spans)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    sent = ExportTraceServiceRequest.FromString(relay.to_otlp(frame[4:]))
    assert same(sent, encode_spans(spans))
    server = sent.resource_spans[0].scope_spans[0].spans[1]
    assert server.name == "POST /query" and server.flags & 0x200  # its parent is remote


def test_a_lean_span_writes_the_row_any_span_would():
    """Our spans build their relay row themselves (the ones the worker does not write as
    OTLP); it must be the row the relay writes for any ReadableSpan."""
    spans = [span for span in _spans(lean=True) if isinstance(span, LeanSpan)]
    assert len(spans) == 2
    for span in spans:
        assert span.events or span.links or span.parent  # the rare fields are there
        assert span.row() == relay._row(span)
    odd = spans[1]
    seven: Any = 7  # the API types keys as str; a caller may still pass another
    odd.attributes = {"raw": b"\x00\xff", "huge": 2**70, "object": object(), seven: "seven"}
    expected = relay._row(odd)
    relay._drop_unwritable(expected)  # the integer OTLP cannot carry goes, alone
    written = relay.encode_row(odd)
    assert written == _record(b"J" + relay._dumps(expected))
    assert orjson.loads(written[5:])[10] == {
        "raw": {BYTES_TAG: "AP8="},
        "object": None,
        "7": "seven",
    }


def _record(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _lean_provider() -> tuple[LeanTracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = LeanTracerProvider(Resource.create({"service.name": "t"}), TracerProvider().sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _relayed(written: list[bytes], spans: list[Any]) -> ExportTraceServiceRequest:
    frame = relay.frame(relay.encode_resource(spans[0].resource), written)
    return ExportTraceServiceRequest.FromString(relay.to_otlp(frame[4:]))


# Attribute values the worker writes itself: every kind, the edges of int64, text that
# is empty, not ASCII, or longer than the writer's stack buffer.
class _Real(float):
    pass  # numpy's floats are float subclasses


class _Size(enum.IntEnum):
    BIG = 7


class _Color(enum.StrEnum):
    RED = "red"


_VALUES: list[Any] = [
    "", "plain", "ünïcødé ✓", "x" * 5000, True, False, 0, 1, -1, 127, 128, 300,
    2**63 - 1, -(2**63), 0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"),
    _Real(2.5), _Size.BIG, _Color.RED,
]  # fmt: skip


def test_the_worker_writes_our_spans_as_the_otlp_the_sdk_would_send():
    """api/telemetry/wire.pyx writes each of our spans as the OTLP Span message itself:
    byte for byte what the relay writes from the span's row, and the message the SDK's
    encoder makes, for every kind, status, parent and attribute value it takes on."""
    provider, memory = _lean_provider()
    tracers = [
        provider.get_tracer("api", "9.9"),
        provider.get_tracer("httpx", None, "https://opentelemetry.io/schemas/1.11.0"),
    ]
    remote = TraceContextTextMapPropagator().extract(
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=opaque,other=x",
        }
    )
    outer = tracers[0].start_span("outer")
    local = trace.set_span_in_context(outer)
    statuses = [
        None,
        Status(StatusCode.OK),
        Status(StatusCode.ERROR),
        Status(StatusCode.ERROR, "✗"),
    ]
    pick = random.Random(12)
    for n in range(60):
        attributes: dict[str, AnyValue] = {
            f"key {i}": pick.choice(_VALUES) for i in range(pick.randrange(12))
        }
        if n % 10 == 0:
            attributes = {f"many {i}": i for i in range(100)}  # outgrows the stack buffer
        span = tracers[n % 2].start_span(
            ["", "POST /query", "généré"][n % 3],
            [None, remote, local][n % 3],
            list(SpanKind)[n % 5],
            attributes,
        )
        status = statuses[n % 4]
        if status is not None:
            span.set_status(status)
        span.end()
    outer.end()
    spans = list(memory.get_finished_spans())
    written = records(spans)
    assert {record[4:5] for record in written} == {b"P"}  # all written by the worker
    for finished, record in zip(spans, written, strict=True):
        scope_size = int.from_bytes(record[5:9], "big")
        row = orjson.loads(relay.encode_row(finished)[5:])
        assert record[9 + scope_size :] == otlp._span(row, SpanLimits()), finished.attributes
    assert same(_relayed(written, spans), encode_spans(spans))


def test_what_the_worker_does_not_write_goes_as_a_row_and_arrives_the_same(
    monkeypatch: pytest.MonkeyPatch,
):
    """A span with what the worker's writer leaves out (events, links, values OTLP needs
    more care with, or more than the limits) goes as a row, which the relay writes; the
    processor's queue writes the others itself. Either way the collector gets what the
    SDK's encoder makes under the same limits."""
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "5")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    provider, memory = _lean_provider()
    tracer = provider.get_tracer("api")
    seven: Any = 7
    rows: dict[str, Any] = {
        "an event": lambda span: span.add_event("e", {"k": "v"}),
        "a link": lambda span: span.add_link(span.get_span_context(), {"why": "x"}),
        "a sequence": {"tags": ("a", "b")},
        "bytes": {"raw": b"\x00\xff"},
        "an object": {"no str": object()},
        "a key that is not a str": {seven: "seven"},
        "an integer beyond int64": {"big": 2**63},
        "text that is not unicode": {"bad": "caf\udce9"},
        "a key that is not unicode": {"caf\udce9": 1},
        "more attributes than the limit": {"a": 1, "b": 2, "c": 3, "d": 4},
        "a value longer than the limit": {"long": "abcdef"},
    }
    for name, detail in rows.items():
        span = tracer.start_span(name, attributes=None if callable(detail) else detail)
        if callable(detail):
            detail(span)
        span.end()
    tracer.start_span("within the limits", attributes={"a": "abcde", "b": 2, "c": None}).end()
    spans = list(memory.get_finished_spans())
    # The processor's queue writes the rows through encode_row alone.
    through_rows: list[Any] = []
    encode_row = relay.encode_row

    def watched(span: Any) -> bytes:
        through_rows.append(span)
        return encode_row(span)

    monkeypatch.setattr(relay, "encode_row", watched)
    written = records(spans)
    monkeypatch.setattr(relay, "encode_row", encode_row)
    assert [record[4:5] for record in written] == [b"J"] * len(rows) + [b"P"]
    assert through_rows == spans[:-1]
    assert written[:-1] == [relay.encode_row(span) for span in spans[:-1]]
    sent = {
        span.name: span for span in _relayed(written, spans).resource_spans[0].scope_spans[0].spans
    }
    assert len(sent) == len(spans)
    over = sent["more attributes than the limit"]
    assert [a.key for a in over.attributes] == [
        "b",
        "c",
        "d",
    ] and over.dropped_attributes_count == 1
    assert sent["a value longer than the limit"].attributes[0].value.string_value == "abcde"
    for name in (
        "an integer beyond int64",
        "text that is not unicode",
        "a key that is not unicode",
    ):
        assert not sent[name].attributes  # the key lost, not the span
    # The SDK's encoder applies no limits (its spans do, as they are made) and logs an
    # error for each odd value: compared where neither matters.
    plain = ("an event", "a link", "a sequence", "bytes", "within the limits")
    kept = [span for span in spans if span.name in plain]
    assert same(_relayed(records(kept), kept), encode_spans(kept))


def test_a_frame_that_is_cut_short_or_unknown_is_refused():
    spans = list(_spans(lean=True))
    written = records(spans)
    whole = relay.frame(relay.encode_resource(spans[0].resource), written)[4:]
    assert relay.to_otlp(whole)
    with pytest.raises(ValueError, match="runs past"):
        relay.to_otlp(whole[:-1])
    unknown = whole[: -len(written[-1])] + written[-1][:4] + b"X" + written[-1][5:]
    with pytest.raises(ValueError, match="unknown span record 0x58"):
        relay.to_otlp(unknown)
    provider, memory = _lean_provider()
    provider.get_tracer("api").start_span("plain").end()
    (plain,) = memory.get_finished_spans()
    (one,) = records([plain])
    assert one[4:5] == b"P"
    scope_size = int.from_bytes(one[5:9], "big")
    too_long = one[:5] + (scope_size + len(one)).to_bytes(4, "big") + one[9:]
    head = relay.encode_resource(spans[0].resource)
    with pytest.raises(ValueError, match="scope runs past"):
        relay.to_otlp(relay.frame(head, [too_long, *written])[4:])


def test_spans_cross_the_relay_process_to_a_collector_and_a_dead_relay_drops_them(
    monkeypatch: pytest.MonkeyPatch,
):
    receiver = OtlpReceiver()
    receiver.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    process = relay.Relay()
    processor = relay.RelaySpanProcessor(process.path, timeout=2)
    spans = _spans()
    try:
        for span in spans:
            processor.on_end(span)
        assert processor.force_flush()
        wait_until(lambda: len(receiver.spans) == 2, 15, "spans at the collector")
        assert {s.span_id for s in receiver.spans} == {
            format(s.context.span_id, "016x") for s in spans
        }
    finally:
        process.stop()
        receiver.stop()
    assert not Path(process.directory).exists()
    # The relay is gone: the batch is dropped and said so, and the worker carries on.
    processor.on_end(spans[0])
    assert not processor.force_flush()
    processor.shutdown()


def test_a_frame_the_relay_cannot_write_costs_that_frame_only(monkeypatch: pytest.MonkeyPatch):
    """A span with a float clock reading (an easy mistake with `start_time`) cannot be
    written as OTLP: its frame is dropped, and the frames after it on the same
    connection still arrive."""
    receiver = OtlpReceiver()
    receiver.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    process = relay.Relay()
    spans = _spans()
    good = relay_frame(spans)
    row = relay._row(spans[0])
    row[8] += 0.5  # the start time
    bad = relay.frame(relay.encode_resource(spans[0].resource), [_record(b"J" + relay._dumps(row))])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(process.path)
            sock.sendall(bad + good)
            wait_until(lambda: len(receiver.spans) == 2, 15, "the good frame's spans")
    finally:
        process.stop()
        receiver.stop()
    assert {s.span_id for s in receiver.spans} == {format(s.context.span_id, "016x") for s in spans}


def test_a_relay_that_dies_is_started_again_until_it_is_stopped(
    monkeypatch: pytest.MonkeyPatch,
):
    receiver = OtlpReceiver()
    receiver.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setattr(relay.Relay, "RESTART_DELAY", 0.2)
    process = relay.Relay()
    processor = relay.RelaySpanProcessor(process.path, timeout=2)
    spans = _spans()
    try:
        first = process.process.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: process.restarts == 1, 30, "a new relay")
        assert process.process.pid != first and process.process.poll() is None
        for span in spans:
            processor.on_end(span)
        assert processor.force_flush()  # reconnected to the new relay on the same path
        wait_until(lambda: len(receiver.spans) == 2, 15, "spans through the new relay")
    finally:
        processor.shutdown()
        process.stop()
        receiver.stop()
    time.sleep(0.5)  # more than the restart delay: a stopped relay stays stopped
    assert process.restarts == 1 and process.process.poll() is not None


def test_a_hung_collector_costs_frames_not_threads_or_memory(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A collector that takes connections and never answers. The relay still reads every
    frame as it comes (a worker's send never waits on the collector), keeps at most
    SPAN_RELAY_MAX_QUEUED_BYTES of them, and drops and reports the rest. Before, a frame
    waiting for the export lock stopped its connection's reading: the worker's send timed
    out, it reconnected, and every reconnection added a thread holding a frame."""
    hung = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(hung.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{hung.getsockname()[1]}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")
    monkeypatch.setenv(relay.MAX_QUEUED_ENV, str(4 * 1024 * 1024))
    spans = _spans()
    resource = relay.encode_resource(spans[0].resource)
    big = relay.frame(resource, records(spans[:1]) * 3000)  # ~1.3 MB
    assert len(big) > 1024 * 1024
    process = relay.Relay()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(process.path)
            for _ in range(20):  # 30 MB: far more than the relay keeps
                sock.sendall(big)
        wait_until(lambda: bool(held), 10, "the relay's first export, hanging")
        threads = len(os.listdir(f"/proc/{process.process.pid}/task"))
        assert threads <= 6, threads
        wait_until(lambda: "frames of spans dropped" in capfd.readouterr().err, 10, "a warning")
    finally:
        hung.close()
        for conn in held:
            conn.close()
        process.stop()


def test_a_relay_stopped_on_purpose_is_not_reported_as_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    process = relay.Relay()
    with caplog.at_level(logging.ERROR, logger=relay.__name__):
        process.stop()
        time.sleep(0.5)  # the watcher's turn
    assert not [r for r in caplog.records if "exited" in r.getMessage()]


def test_a_relay_reaped_by_someone_else_is_started_again(monkeypatch: pytest.MonkeyPatch):
    """Under gunicorn the master's SIGCHLD handler (waitpid(-1)) may reap the relay before
    the watcher's own wait does, which then finds no such child."""
    monkeypatch.setattr(relay.Relay, "RESTART_DELAY", 0.2)
    process = relay.Relay()
    first = process.process.pid
    waitpid = os.waitpid

    def reaped_elsewhere(pid: int, options: int) -> tuple[int, int]:
        found = waitpid(pid, options)
        if pid == first and found[0] == first:
            raise ChildProcessError(10, "No child processes")
        return found

    monkeypatch.setattr(os, "waitpid", reaped_elsewhere)
    try:
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: process.restarts == 1, 30, "a new relay")
        assert process.process.poll() is None and os.path.exists(process.path)
    finally:
        process.stop()


def test_a_full_batch_goes_at_once_and_a_full_queue_drops(
    monkeypatch: pytest.MonkeyPatch,
):
    """The SDK's batching rules: a batch is sent when it is full, not only when the delay
    has passed, and spans beyond the queue's size are dropped, never waited for."""
    receiver = OtlpReceiver()
    receiver.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    process = relay.Relay()
    processor = relay.RelaySpanProcessor(process.path, timeout=2)
    try:
        for span in _spans():
            processor.on_end(span)
        wait_until(lambda: len(receiver.spans) == 2, 15, "a full batch, sent without a flush")
        processor.shutdown()
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "3")
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1000")
        processor = relay.RelaySpanProcessor(process.path, timeout=2)
        spans = _spans() + _spans() + _spans()
        with processor._send_lock:  # the sender may not empty the queue meanwhile
            for span in spans:
                processor.on_end(span)
        assert processor.force_flush()
        wait_until(lambda: len(receiver.spans) == 5, 15, "the queue's three spans")
        time.sleep(0.5)
        assert len(receiver.spans) == 5
        assert {s.span_id for s in receiver.spans[2:]} == {
            format(s.context.span_id, "016x") for s in spans[:3]
        }
    finally:
        processor.shutdown()
        process.stop()
        receiver.stop()


class _Queued(SpanProcessor):
    def __init__(self, queue: Any) -> None:
        self.on_end = queue.put  # type: ignore[method-assign]


def test_a_span_ended_by_a_finaliser_in_the_middle_of_a_write_keeps_both_records():
    """Making an exception can start a collection, and a finaliser it runs can end
    another span, whose record the queue writes at once. The writer of the span that
    turns out to need its row (a text that is not Unicode) writes into a buffer of its
    own, so the two records never mix."""
    queue = relay.span_queue(10, 10, threading.Event())
    provider = LeanTracerProvider(Resource.create({"service.name": "t"}), TracerProvider().sampler)
    provider.add_span_processor(_Queued(queue))
    tracer = provider.get_tracer("api")
    # The resource and the scope encoded now: made later, they would start the collection
    # before the write this test is about.
    tracer.start_span("first").end()
    inner = tracer.start_span("ended by a finaliser", attributes={"n": 1})
    outer = tracer.start_span("odd", attributes={"ok": "a", "bad": "caf\udce9"})

    class Garbage:
        def __del__(self) -> None:
            inner.end()

    gc.collect()
    cycle = Garbage()
    cycle.itself = cycle  # type: ignore[attr-defined]
    del cycle
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # the next object the collector tracks starts a collection
    try:
        outer.end()
    finally:
        gc.set_threshold(*threshold)
    assert isinstance(inner, LeanSpan) and inner.end_time is not None  # it ran in between
    written, dropped = queue.take()
    assert dropped == 0 and len(written) == 3
    sent = _relayed(written, [outer])
    spans = {span.name: span for span in sent.resource_spans[0].scope_spans[0].spans}
    assert set(spans) == {"first", "odd", "ended by a finaliser"}
    assert [a.key for a in spans["odd"].attributes] == ["ok"]  # the bad key lost, alone
    assert spans["ended by a finaliser"].attributes[0].value.int_value == 1


class _RecordOnly(Sampler):
    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(Decision.RECORD_ONLY)

    def get_description(self) -> str:
        return "record only"


def test_an_unsampled_span_is_not_sent() -> None:
    processor = relay.RelaySpanProcessor("/nonexistent/relay.sock", timeout=1)
    unsampled = TracerProvider(sampler=_RecordOnly())
    try:
        span = unsampled.get_tracer("t").start_span("x")
        span.end()
        processor.on_end(span)  # type: ignore[arg-type]
        assert processor.force_flush()  # nothing to send, so nothing failed
    finally:
        processor.shutdown()


def test_links_survive():
    spans = _spans()
    sent = relayed(spans)
    (link,) = sent.resource_spans[0].scope_spans[0].spans[0].links
    assert link.span_id == spans[1].context.span_id.to_bytes(8, "big")
    assert [(a.key, a.value.string_value) for a in link.attributes] == [("why", "test")]


def test_a_stopping_server_still_delivers_its_last_spans(tmp_path: Path) -> None:
    """The batch processor holds spans for a while (here: ten minutes, so only the flush at
    shutdown can deliver them); a replica stopped sooner must flush them through the
    relay, and the relay must send them on before it goes."""
    receiver = OtlpReceiver()
    receiver.start()
    server = ApiServer(
        tmp_path,
        "flush",
        GENERATOR="extractive",
        OTEL_SDK_DISABLED="false",
        OTEL_TRACES_SAMPLER="always_on",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_SERVICE_NAME="rag-api-flush",
        OTEL_BSP_SCHEDULE_DELAY="600000",
    )
    try:
        server.start()
        response = httpx.post(
            f"{server.base}/query", json={"question": "How do I restore a backup?"}, timeout=60
        )
        assert response.status_code == 200
        server.stop()  # SIGTERM, well inside the processor's delay
        assert any(
            s.name == "POST /query" and s.service == "rag-api-flush" for s in receiver.spans
        ), [s.name for s in receiver.spans]
    finally:
        server.stop()
        receiver.stop()


def test_a_relay_that_cannot_start_leaves_the_replica_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gunicorn's on_starting hook: a relay that fails to start (no /dev/shm space, no file
    descriptors) is logged, and the workers export their own spans, rather than the
    exception stopping gunicorn from booting at all."""
    from api import gunicorn_conf

    def fails() -> relay.Relay:
        raise RuntimeError("span relay did not start")

    logged: list[str] = []

    class Server:
        class log:  # gunicorn's server.log, as the hook uses it
            @staticmethod
            def error(message: str) -> None:
                logged.append(message)

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv(relay.SOCKET_ENV, "/stale/from/an/earlier/master")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(gunicorn_conf, "Relay", fails)
    gunicorn_conf.on_starting(Server())
    assert logged and "did not start" in logged[0]
    assert relay.SOCKET_ENV not in os.environ  # so each worker exports for itself
    assert gunicorn_conf._relay is None

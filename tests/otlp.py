"""A real OTLP/HTTP trace receiver for tests: decodes ExportTraceServiceRequest bodies."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan

from api.telemetry import relay


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, object]
    service: str
    trace_state: str = ""
    duration_ns: int = 0


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver._take(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes = {a.key: _value(a.value) for a in span.attributes}
                        self.spans.append(
                            ReceivedSpan(
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                                span.name,
                                span.kind,
                                attributes,
                                service,
                                span.trace_state,
                                span.end_time_unix_nano - span.start_time_unix_nano,
                            )
                        )

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, check: Callable[[], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "spans did not arrive"
            time.sleep(0.1)


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


def records(spans: Sequence[ReadableSpan]) -> list[bytes]:
    """The records a worker's span processor queues for `spans`, through its real queue."""
    queue = relay.span_queue(len(spans) + 1, len(spans) + 1, threading.Event())
    for span in spans:
        queue.put(span)
    written, dropped = queue.take()
    assert dropped == 0 and len(written) == len(spans)
    return written


def relay_frame(spans: Sequence[ReadableSpan]) -> bytes:
    """The frame a worker's span processor sends the relay for `spans` (one resource)."""
    resource = relay.encode_resource(spans[0].resource if spans else None)
    return relay.frame(resource, records(spans))


def relayed(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """What the relay posts for `spans`, parsed back."""
    return ExportTraceServiceRequest.FromString(relay.to_otlp(relay_frame(spans)[4:]))


def same(a: ExportTraceServiceRequest, b: ExportTraceServiceRequest) -> bool:
    """Equal, compared as deterministic bytes: a field the relay wrote under a wrong number
    or wire type parses as an unknown field, which this sees and `==` may not."""
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)

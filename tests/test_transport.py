"""The span relay posts to a plain-HTTP collector over one kept-alive connection of its own
(api/telemetry/transport.py) instead of the exporter's `requests` session. Held here to the
exporter's own transport, against real HTTP servers: what arrives, retries, a connection
the collector drops, a collector that never answers, and the cases it leaves to
`requests`."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from api.telemetry import relay
from api.telemetry.transport import KeptAliveTransport, lean_transport
from tests.otlp import relay_frame

# Proxy settings the tests' environment might carry: a lean post needs none set.
_PROXIES = [f"{scheme}_proxy" for scheme in ("http", "https", "all", "no")]
_PROXIES += [name.upper() for name in _PROXIES]


@dataclass(frozen=True)
class Post:
    connection: int
    path: str
    headers: dict[str, str]
    body: bytes


class Collector:
    """Records every POST with the connection it came on, and answers from a script:
    (status, extra headers) for each post in turn, then 200."""

    def __init__(self, idle_timeout: float | None = None) -> None:
        self.posts: list[Post] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        connections = itertools.count()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector's receiver
            timeout = idle_timeout  # an idle connection is closed, without a word

            def setup(self) -> None:
                super().setup()
                self.connection_number = next(connections)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                collector.posts.append(Post(self.connection_number, self.path, headers, body))
                status, extra = collector.script.pop(0) if collector.script else (200, {})
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")  # conftest turns it off for apps
    for name in _PROXIES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    running = Collector(idle_timeout=0.5)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", running.endpoint)
    yield running
    running.stop()


def _request() -> bytes:
    """A real OTLP request, as the relay makes it from a worker's frame."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("api").start_as_current_span("POST /query", attributes={"k": 3}):
        pass
    return relay.to_otlp(relay_frame(memory.get_finished_spans())[4:])


def _both() -> tuple[relay.OtlpSender, OTLPSpanExporter]:
    """The relay's sender and the exporter with its own `requests` transport, both
    configured by the same environment."""
    sender = relay.OtlpSender()
    assert isinstance(sender.transport, KeptAliveTransport)
    return sender, OTLPSpanExporter()


def test_what_arrives_is_what_the_exporter_sends(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=blue,authorization=Bearer%20t0k")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    sender, exporter = _both()
    request = _request()
    assert sender.send(request)
    assert exporter._client.export(request).success
    ours, theirs = collector.posts
    assert ours.path == theirs.path == "/v1/traces"
    assert gzip.decompress(ours.body) == gzip.decompress(theirs.body) == request
    # The premise: what went is a real request with spans, not an empty body.
    assert ExportTraceServiceRequest.FromString(request).resource_spans[0].scope_spans
    # Every header the exporter asks for arrives the same. What differs is each HTTP
    # client's own: requests offers compressed replies, http.client does not.
    for name in ("content-type", "user-agent", "content-encoding", "x-tenant", "authorization"):
        assert ours.headers[name] == theirs.headers[name], name
    assert ours.headers["authorization"] == "Bearer t0k"
    sender.shutdown()
    exporter.shutdown()


@pytest.mark.parametrize(
    ("script", "sent", "posts"),
    [
        ([(503, {"retry-after": "0"})], True, 2),  # asked to wait, for no time at all
        ([(429, {"retry-after": "0"}), (502, {"retry-after": "0"})], True, 3),
        ([(400, {})], False, 1),  # not retried: the collector refuses the request
        ([], True, 1),
    ],
)
def test_retries_are_the_exporters(
    collector: Collector, script: list[tuple[int, dict[str, str]]], sent: bool, posts: int
) -> None:
    sender, exporter = _both()
    request = _request()
    outcomes = []
    for send in (sender.send, lambda body: bool(exporter._client.export(body).success)):
        collector.posts.clear()
        collector.script = list(script)
        outcomes.append((send(request), len(collector.posts)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == (sent, posts)
    sender.shutdown()
    exporter.shutdown()


def test_a_reply_s_headers_are_read_whatever_their_case(collector: Collector) -> None:
    """The client reads Retry-After in lower case; a collector may write it in any."""
    collector.script = [(503, {"Retry-After": "7", "X-Note": "a"}), (503, {"x-note": "b"})]
    transport = KeptAliveTransport()
    try:
        reply = transport.request("POST", f"{collector.endpoint}/v1/traces", data=b"x")
    finally:
        transport.close()
    assert reply.status_code == 503
    assert reply.headers().get("retry-after") == reply.headers()["RETRY-AFTER"] == "7"
    with pytest.raises(KeyError):
        reply.headers()["absent"]  # a Mapping, as the base class asks


def test_posts_share_a_connection_and_outlive_the_collector_dropping_it(
    collector: Collector,
) -> None:
    sender = relay.OtlpSender()
    request = _request()
    for _ in range(5):
        assert sender.send(request)
    assert {p.connection for p in collector.posts} == {0}
    time.sleep(1.0)  # past the collector's idle timeout: it closes the connection
    assert sender.send(request)  # the stale connection fails; the post goes on a new one
    assert [p.connection for p in collector.posts] == [0] * 5 + [1]
    sender.shutdown()


def test_a_collector_that_never_answers_costs_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as hung:  # accepts, never replies
        monkeypatch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{hung.getsockname()[1]}"
        )
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        sender = relay.OtlpSender()
        assert sender.transport is not None
        started = time.monotonic()
        result = sender._exporter._client.export(_request())
        waited = time.monotonic() - started
        sender.shutdown()
    assert not result.success
    assert isinstance(result.error, TimeoutError)
    assert 0.9 < waited < 3  # the timeout, once: no retry fits in what is left of it


def _answers_early(server: socket.socket, accepted: list[socket.socket]) -> None:
    """A collector that refuses a post from its headers alone (too large), answers, and
    closes without reading the body, as a proxy with a body limit does."""
    with contextlib.suppress(OSError):
        while True:
            connection = server.accept()[0]
            accepted.append(connection)
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            time.sleep(0.2)  # the client is still sending: closing now resets its send
            connection.close()


def test_a_collector_that_refuses_before_reading_the_body_is_heard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not retried until the timeout: the 413 is the answer, as the exporter hears it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        accepted: list[socket.socket] = []
        threading.Thread(target=_answers_early, args=(server, accepted), daemon=True).start()
        monkeypatch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}"
        )
        sender, exporter = _both()
        big = os.urandom(8 * 1024 * 1024)  # more than the socket buffers hold
        outcomes = []
        for client in (sender._exporter._client, exporter._client):
            accepted.clear()
            result = client.export(big)
            outcomes.append((result.success, result.status_code, len(accepted)))
        sender.shutdown()
        exporter.shutdown()
    assert outcomes[0] == outcomes[1] == (False, 413, 1)


def test_what_requests_would_do_differently_is_left_to_requests(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert lean_transport("http://127.0.0.1:4318/v1/traces") is not None
    assert lean_transport("https://127.0.0.1:4318/v1/traces") is None  # TLS: requests' CAs
    assert lean_transport("http://user:pw@127.0.0.1:4318/v1/traces") is None  # basic auth
    monkeypatch.setenv("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER", "vault")
    assert lean_transport("http://127.0.0.1:4318/v1/traces") is None
    monkeypatch.delenv("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER")

    # A proxy in the environment: the post goes through it, as the exporter's would. The
    # "collector" here plays the proxy; the endpoint itself is never connected to.
    monkeypatch.setenv("HTTP_PROXY", collector.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    sender = relay.OtlpSender()
    assert sender.transport is None
    assert sender.send(_request())
    (post,) = collector.posts
    assert post.path == "http://127.0.0.1:9/v1/traces"  # a proxy's absolute-form target
    sender.shutdown()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # ...unless the endpoint is exempt
    assert lean_transport("http://127.0.0.1:9/v1/traces") is not None
    monkeypatch.delenv("HTTP_PROXY")  # NO_PROXY alone, as many clusters set it
    monkeypatch.setenv("NO_PROXY", ".svc.cluster.local")
    assert lean_transport("http://127.0.0.1:9/v1/traces") is not None

    # What requests would reject or rewrite, it does itself.
    assert lean_transport("http://127.0.0.1:43l8/v1/traces") is None  # not a port
    assert lean_transport("http://127.0.0.1:4318/v1/my traces") is None  # escaped by requests

"""Metrics, traces and logs of a real gunicorn with two workers, exported to a real OTLP
receiver, with a real Chroma server, Redis and llama.cpp behind it."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from api.telemetry import flusher
from api.telemetry.logs import add_timestamp
from tests.conftest import CORPUS_DIR
from tests.otlp import OtlpReceiver
from tests.servers import ApiServer, RedisServer, RefusingProxy, children, wait_until

SERVER, CLIENT = 2, 3  # OTLP span kinds


@dataclass
class Stack:
    base: str
    process: ApiServer
    otlp: OtlpReceiver
    proxy: RefusingProxy

    def workers(self) -> set[int]:
        """The gunicorn workers: the master's children, apart from its span relay."""
        return set(self._under_master()) - set(self.relays())

    def relays(self) -> list[int]:
        """The master's span relay (one, unless it is being replaced)."""
        return [
            pid
            for pid in self._under_master()
            if b"api.telemetry.relay" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    def _under_master(self) -> list[int]:
        assert self.process.proc is not None  # the runner; the master is its child
        return [pid for master in children(self.process.proc.pid) for pid in children(master)]

    def metrics(self, openmetrics: bool = False) -> dict[str, list]:
        accept = "application/openmetrics-text" if openmetrics else "text/plain"
        text = httpx.get(f"{self.base}/metrics", headers={"accept": accept}).text
        parse = parse_openmetrics if openmetrics else parse_prometheus
        return {family.name: family.samples for family in parse(text)}

    def log_lines(self) -> list[str]:
        return [line for line in self.process.output().splitlines() if line.strip()]

    def served_by(self) -> dict[str, int]:
        """Request id -> the pid of the worker that wrote its access line."""
        found = {}
        for line in self.log_lines():
            if line.startswith("{") and '"api.access"' in line:
                record = json.loads(line)
                found[record["request_id"]] = record["pid"]
        return found

    def ask_until_every_worker_answered(self, questions: list[str], most: int = 400) -> int:
        """POST /query, cycling through `questions`, until each worker has answered at
        least one (a new connection per request does not make gunicorn spread them: an
        idle worker may take them all). Returns how many were sent."""
        workers, sent, mine = self.workers(), 0, set()
        while sent < most:
            for _ in range(10):
                request_id = f"spread-{secrets.token_hex(8)}"
                body = {"question": questions[sent % len(questions)]}
                response = httpx.post(
                    f"{self.base}/query",
                    json=body,
                    headers={"x-request-id": request_id},
                    timeout=60,
                )
                assert response.status_code == 200
                mine.add(request_id)
                sent += 1
            wait_until(lambda: mine <= self.served_by().keys(), 10, "the access lines")
            served = self.served_by()
            if {served[r] for r in mine} == workers:
                return sent
        raise AssertionError(f"{most} requests, and not every worker of {workers} answered one")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, chroma_server, llm_server) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observed")
    redis_server = RedisServer(tmp / "redis")
    redis_server.start()
    otlp = OtlpReceiver()
    otlp.start()
    # Configured as an engineer behind a corporate proxy would have it: every proxy
    # variable set and no exemptions. Everything this stack calls is on 127.0.0.1, which no
    # proxy can reach; test_loopback_calls_never_go_through_a_proxy checks it was not used.
    proxy = RefusingProxy()
    proxy.start()
    process = ApiServer(
        tmp,
        "observed",
        WEB_CONCURRENCY="2",
        CHROMA_HOST="127.0.0.1",
        CHROMA_PORT=str(chroma_server.port),
        REDIS_URL=redis_server.url,
        INGEST_ON_START="false",
        LOG_FORMAT="json",
        LLM_BASE_URL=llm_server.base_url,
        LLM_GGUF=str(llm_server.model),
        LLM_MAX_TOKENS="16",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_SERVICE_NAME="rag-api-test",
        OTEL_TRACES_SAMPLER="always_on",
        OTEL_SDK_DISABLED="false",
        **proxy.environment(),
    )
    base = process.base
    stack = Stack(base, process, otlp, proxy)
    try:
        process.start()
        # Both workers up and reporting before any test counts on them.
        wait_until(
            lambda: len(stack.metrics().get("rag_worker_resident_memory_bytes", [])) == 2,
            60,
            "two workers",
        )
        files = [
            ("files", (p.name, p.read_bytes(), "text/markdown"))
            for p in sorted(CORPUS_DIR.glob("*.md"))
        ]
        assert httpx.post(f"{base}/documents", files=files, timeout=120).status_code == 200
        yield stack
    finally:
        process.stop()
        otlp.stop()
        redis_server.stop()
        proxy.stop()


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _steady(read: Callable[[], float], what: str) -> float:
    """`read()` once two reads three flusher ticks apart agree: whatever increments were on
    their way to the shared files have landed."""
    seen: list[float] = []

    def agreed() -> bool:
        seen.append(read())
        time.sleep(3 * flusher.TICK)
        seen.append(read())
        return seen[-1] == seen[-2]

    wait_until(agreed, 15, what)
    return seen[-1]


def test_counters_add_up_exactly_across_workers(stack: Stack) -> None:
    labels = {
        "http_route": "/query",
        "http_request_method": "POST",
        "http_response_status_code": "200",
    }
    count = "http_server_request_duration_seconds_count"

    def counted_so_far() -> float:
        return _value(stack.metrics()["http_server_request_duration_seconds"], count, **labels)

    _steady(counted_so_far, "earlier requests counted")
    before = stack.metrics()["http_server_request_duration_seconds"]
    n = stack.ask_until_every_worker_answered(
        ["Who is on call?", "What happens when Redis is down?"]
    )

    def counted() -> float:
        after = stack.metrics()["http_server_request_duration_seconds"]
        return _value(after, count, **labels) - _value(before, count, **labels)

    # Increments reach the shared files within a flusher tick: wait for them, then see
    # that none is missing and none is counted twice.
    wait_until(lambda: counted() >= n, 5, "the requests counted")
    _steady(counted, "no more increments")
    families = stack.metrics()
    after = families["http_server_request_duration_seconds"]
    assert _value(after, count, **labels) - _value(before, count, **labels) == n
    # Buckets rise to +Inf, which equals the count; the sum is plausible.
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for s in after
        if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items())
    )
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert buckets[-1] == (float("inf"), _value(after, count, **labels))
    total = _value(after, "http_server_request_duration_seconds_sum", **labels)
    assert 0 < total < 60 * buckets[-1][1]
    # /metrics itself is not counted; routes are templates, never raw paths.
    routes = {s.labels["http_route"] for s in after}
    assert "/metrics" not in routes and routes <= {
        "/query",
        "/documents",
        "/ready",
        "/health",
        "/documents/{doc_id}",
    }
    cache = families["rag_cache_requests"]
    assert _value(cache, "rag_cache_requests_total", layer="answer", result="hit") >= n - 2
    assert _value(families["rag_store_documents"], "rag_store_documents") == 10
    assert _value(families["rag_build_info"], "rag_build_info") == 1


def test_worker_process_metrics_follow_the_live_workers(stack: Stack) -> None:
    def reported() -> set[int]:
        return {
            int(s.labels["pid"])
            for s in stack.metrics().get("rag_worker_resident_memory_bytes", [])
        }

    workers = stack.workers()
    assert len(workers) == 2 and reported() == workers
    rss = stack.metrics()["rag_worker_resident_memory_bytes"]
    assert all(100e6 < s.value < 4e9 for s in rss)  # a model-holding worker, in bytes
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    # gunicorn replaces the worker; the dead one's series must go, the new one's appear.
    wait_until(
        lambda: (
            len(stack.workers()) == 2
            and victim not in stack.workers()
            and reported() == stack.workers()
        ),
        90,
        "replacement worker reported",
    )
    assert victim not in reported()


def test_one_query_is_one_trace_continuing_the_callers(stack: Stack) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    request_id = "test-" + secrets.token_hex(6)
    response = httpx.post(
        f"{stack.base}/query",
        json={"question": "How do I restore a backup, step by step?"},
        headers={"traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": request_id},
        timeout=60,
    )
    assert response.status_code == 200 and response.json()["cached"] is False
    assert response.headers["x-request-id"] == request_id

    names = {"embed", "retrieve", "generate"}
    stack.otlp.wait_for(
        lambda: (
            names <= {s.name for s in stack.otlp.trace(trace_id)}
            and any(s.kind == SERVER for s in stack.otlp.trace(trace_id))
        )
    )
    time.sleep(0.5)  # late client spans of the same batch
    spans = stack.otlp.trace(trace_id)
    servers = [s for s in spans if s.kind == SERVER]
    assert len(servers) == 1
    server = servers[0]
    assert server.parent_id == parent and server.service == "rag-api-test"
    assert server.name == "POST /query"
    by_name = {s.name: s for s in spans}
    for name in names:
        assert by_name[name].parent_id == server.span_id, name
    assert by_name["retrieve"].attributes["rag.top_k"] == 3
    assert by_name["retrieve"].attributes["rag.chunks_returned"] == 3
    assert int(str(by_name["generate"].attributes["rag.completion_tokens"])) > 0
    redis_spans = [
        s
        for s in spans
        if s.attributes.get("db.system") == "redis" or s.attributes.get("db.system.name") == "redis"
    ]
    assert redis_spans and all(s.parent_id == server.span_id for s in redis_spans)
    # The LLM request is a client span under `generate`; Chroma's HTTP calls are clients too.
    clients = [s for s in spans if s.kind == CLIENT and s not in redis_spans]
    assert any(s.parent_id == by_name["generate"].span_id for s in clients)
    assert any(s.parent_id == by_name["retrieve"].span_id for s in clients)

    # The access log line of that request, in JSON, carries the same ids.
    records = [json.loads(line) for line in stack.log_lines()]
    access = [
        r for r in records if r.get("event") == "request" and r.get("request_id") == request_id
    ]
    assert len(access) == 1
    line = access[0]
    assert line["trace_id"] == trace_id and line["route"] == "/query" and line["status"] == 200
    assert line["cached"] is False and line["level"] == "info" and "timestamp" in line
    assert "span_id" in line
    # In ms, to two decimals, and within the server span, which begins just before the
    # line's clock starts and ends just after it stops. An uncached answer takes longer
    # than 5 ms: a duration in seconds would fail.
    assert line["duration_ms"] == round(line["duration_ms"], 2)
    assert line["duration_ms"] > 5
    assert -0.5 < server.duration_ns / 1e6 - line["duration_ms"] < 50


def test_repeated_trace_headers_are_one_list_and_two_traceparents_start_afresh(
    stack: Stack,
) -> None:
    trace_id = secrets.token_hex(16)
    sent = [
        ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),
        ("tracestate", "a=1"),
        ("tracestate", "b=2"),
    ]
    assert httpx.get(f"{stack.base}/documents", headers=sent).status_code == 200
    stack.otlp.wait_for(lambda: any(s.kind == SERVER for s in stack.otlp.trace(trace_id)))
    (server,) = [s for s in stack.otlp.trace(trace_id) if s.kind == SERVER]
    assert server.trace_state == "a=1,b=2"  # both lines' members, in order

    # Two traceparents say two things: neither is continued.
    request_id = "twice-" + secrets.token_hex(6)
    given = [secrets.token_hex(16), secrets.token_hex(16)]
    sent = [("traceparent", f"00-{t}-{secrets.token_hex(8)}-01") for t in given]
    response = httpx.get(f"{stack.base}/documents", headers=[*sent, ("x-request-id", request_id)])
    assert response.status_code == 200
    wait_until(lambda: request_id in stack.served_by(), 10, "the access line")
    (line,) = [
        json.loads(text) for text in stack.log_lines() if f'"request_id":"{request_id}"' in text
    ]
    assert line["trace_id"] not in given
    stack.otlp.wait_for(lambda: any(s.kind == SERVER for s in stack.otlp.trace(line["trace_id"])))
    (server,) = [s for s in stack.otlp.trace(line["trace_id"]) if s.kind == SERVER]
    assert server.parent_id == ""  # a root


def test_loopback_calls_never_go_through_a_proxy(stack: Stack) -> None:
    """The stack serves with HTTP_PROXY, HTTPS_PROXY and ALL_PROXY set and NO_PROXY empty:
    Chroma, the LLM and the OTLP collector on 127.0.0.1 are still called directly."""
    trace_id = secrets.token_hex(16)
    response = httpx.post(
        f"{stack.base}/query",
        json={"question": f"Which port does the stack's Prometheus use? ({secrets.token_hex(4)})"},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.json()["cached"] is False and response.json()["generator"] == "openai"
    stack.otlp.wait_for(lambda: any(s.kind == SERVER for s in stack.otlp.trace(trace_id)))
    ready = httpx.get(f"{stack.base}/ready", timeout=10).json()["dependencies"]
    assert ready["chroma"]["status"] == ready["llm"]["status"] == "ok"
    assert stack.proxy.requests == []


def test_an_unknown_method_mints_no_series(stack: Stack) -> None:
    """OpenTelemetry's rule: a method outside the HTTP standard's is "_OTHER" in metric
    labels and span names (the original kept as an attribute), so a client cannot make
    new series by inventing methods. The access line keeps what was sent."""
    trace_id, request_id = secrets.token_hex(16), "odd-" + secrets.token_hex(6)
    response = httpx.request(
        "PROPFIND",
        f"{stack.base}/query",
        headers={
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
            "x-request-id": request_id,
        },
        timeout=60,
    )
    assert response.status_code == 405 and response.headers["x-request-id"] == request_id

    def methods() -> set[str]:
        samples = stack.metrics()["http_server_request_duration_seconds"]
        return {
            s.labels["http_request_method"] for s in samples if s.labels["http_route"] == "/query"
        }

    wait_until(lambda: "_OTHER" in methods(), 5, "the request counted")
    assert "PROPFIND" not in methods()
    stack.otlp.wait_for(lambda: bool(stack.otlp.trace(trace_id)))
    (server,) = [s for s in stack.otlp.trace(trace_id) if s.kind == SERVER]
    assert server.name == "HTTP /query"
    assert server.attributes["http.request.method"] == "_OTHER"
    assert server.attributes["http.request.method_original"] == "PROPFIND"

    def access() -> list[dict[str, object]]:
        return [
            r
            for r in map(json.loads, stack.log_lines())
            if r.get("event") == "request" and r.get("request_id") == request_id
        ]

    wait_until(lambda: bool(access()), 5, "the access line")
    assert [(r["method"], r["status"]) for r in access()] == [("PROPFIND", 405)]


def test_every_log_line_is_json(stack: Stack) -> None:
    lines = stack.log_lines()
    assert len(lines) > 20
    for line in lines:
        record = json.loads(line)
        assert {"event", "level", "timestamp"} <= set(record), line
        # ISO 8601, UTC, microseconds, and written within the run (not a cached second)
        stamp = datetime.fromisoformat(record["timestamp"])
        assert stamp.utcoffset() == timedelta(0) and len(record["timestamp"]) == 27
        assert abs(stamp.timestamp() - time.time()) < 600, record["timestamp"]


def test_timestamps_match_structlogs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours formats the date once a second. The reference is what structlog's
    TimeStamper(fmt="iso", utc=True) writes, datetime's isoformat (which, unlike ours,
    drops the fraction when it is exactly zero: not among these instants)."""
    clock = iter([1_800_000_000.25, 1_800_000_000.999999, 1_800_000_001.000001])
    for now in clock:
        monkeypatch.setattr(time, "time", lambda now=now: now)
        ours = add_timestamp(None, "info", {})["timestamp"]
        reference = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
        assert ours == reference


def test_exemplars_link_to_exported_traces_whichever_worker_answers(stack: Stack) -> None:
    questions = [f"exemplar question {i}?" for i in range(400)]  # each new: no cached answer
    stack.ask_until_every_worker_answered(questions)

    def exemplars() -> set[str]:
        samples = stack.metrics(openmetrics=True)["http_server_request_duration_seconds"]
        return {s.exemplar.labels["trace_id"] for s in samples if s.exemplar is not None}

    # Workers write their exemplars about once a second, later under load: wait until
    # four scrapes over three seconds agree (two could both reach a worker whose own
    # exemplars are merged in, while the other's write is still pending).
    def settled() -> bool:
        first = exemplars()
        for _ in range(3):
            time.sleep(1)
            if not first or exemplars() != first:
                return False
        return True

    wait_until(settled, 40, "the exemplars written")
    seen = [exemplars() for _ in range(6)]  # each scrape on a new connection: either worker
    assert seen[0] and all(s == seen[0] for s in seen)
    stack.otlp.wait_for(lambda: all(stack.otlp.trace(t) for t in seen[0]))
    for trace_id in seen[0]:
        assert any(s.kind == SERVER for s in stack.otlp.trace(trace_id))


def test_a_graceful_restart_loses_no_count(stack: Stack) -> None:
    """Increments wait in the worker for the flusher; replacing every worker (the master's
    HUP, as a config reload does) must still leave every request counted exactly once."""
    labels = {
        "http_route": "/query",
        "http_request_method": "POST",
        "http_response_status_code": "200",
    }
    count = "http_server_request_duration_seconds_count"

    def counted() -> float:
        return _value(stack.metrics()["http_server_request_duration_seconds"], count, **labels)

    before = _steady(counted, "earlier requests counted")
    old = stack.workers()
    n = 20
    for i in range(n):
        body = {"question": "Who is on call?" if i % 2 else "What happens when Redis is down?"}
        assert httpx.post(f"{stack.base}/query", json=body, timeout=60).status_code == 200
    (master,) = {
        int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in old
    }
    os.kill(master, signal.SIGHUP)
    wait_until(
        lambda: len(stack.workers()) == 2 and not stack.workers() & old,
        90,
        "two new workers",
    )
    wait_until(
        lambda: len(stack.metrics().get("rag_worker_resident_memory_bytes", [])) == 2,
        60,
        "the new workers reporting",
    )
    assert _steady(counted, "the old workers' last increments") - before == n


def test_a_killed_span_relay_is_started_again_and_traces_resume(stack: Stack) -> None:
    """The master's watcher starts a new relay on the same socket (gunicorn's own SIGCHLD
    handler may reap the dead one first), and the workers reconnect to it."""
    (old,) = stack.relays()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: stack.relays() not in ([], [old]), 30, "a new relay")
    (new,) = stack.relays()
    assert new != old

    def traced() -> bool:
        trace_id = secrets.token_hex(16)
        response = httpx.post(
            f"{stack.base}/query",
            json={"question": "Who is on call?"},
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
            timeout=60,
        )
        assert response.status_code == 200
        time.sleep(1)  # the workers send every 0.1 s here (OTEL_BSP_SCHEDULE_DELAY)
        return any(s.kind == SERVER for s in stack.otlp.trace(trace_id))

    # A worker's first send after the kill may still find the old socket gone and drop its
    # batch (its own rule); within a few requests, every worker has reconnected.
    wait_until(traced, 30, "a trace through the new relay")
    assert any(
        "span relay exited" in line and "starting it again" in line for line in stack.log_lines()
    )


def test_an_increment_the_metrics_file_did_not_take_is_written_at_the_next_flush() -> None:
    """Increments wait in C until the flusher writes them (api/telemetry/tallies.pyx): a
    write that fails (the tmpfs is full and the file cannot grow) keeps its amount for the
    next flush instead of losing it, and the other values are still written."""
    from prometheus_client import CollectorRegistry, Histogram

    from api.telemetry import flusher, metrics, tallies

    class FileThatFillsOnce:
        def __init__(self) -> None:
            self.value = 0.0
            self.full = True

        def inc(self, amount: float) -> None:
            if self.full:
                self.full = False
                raise OSError(28, "No space left on device")
            self.value += amount

    value = FileThatFillsOnce()
    tally = tallies.Tally(value)
    histogram = Histogram("t_seconds", "t", buckets=(0.1, 1), registry=CollectorRegistry())
    series = tallies.Series(histogram, {}, metrics.Exemplars(None))
    # An app an earlier test started leaves this process's flusher thread running; it
    # would flush between the steps below (CI saw it write the 3 after the file was
    # "filled" again). Holding its lock keeps every flush here the test's own.
    with flusher._running:
        tally.inc(3)
        series.observe(0.5, None)
        with pytest.raises(OSError):
            metrics.flush_pending()  # the flusher reports it and goes on
        assert histogram._sum.get() == 0.5  # written despite the other's failure
        value.full = True
        body, _ = metrics.exposition("text/plain")  # a scrape still answers
        assert b"http_server_request_duration_seconds" in body
        assert value.value == 0
        tally.inc(1)
        tally.dec(0.5)
        series.observe(2.0, None)
        metrics.flush_pending()
        assert value.value == 3.5
        assert [b.get() for b in histogram._buckets] == [0, 1, 1]
        assert histogram._sum.get() == 2.5

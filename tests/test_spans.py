"""The lean tracer (api/telemetry/spans.pyx) must be indistinguishable from the SDK's on the
wire: the same spans, ids, flags, attributes, events, links and statuses, and the same
sampling decisions under all six standard OTEL_TRACES_SAMPLER settings."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
    StaticSampler,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AnyValue

from api.telemetry.spans import LeanTracerProvider
from tests.otlp import relayed, same

RESOURCE = Resource({"service.name": "rag-api"})
CALLER = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=opaque",
}


@pytest.fixture(autouse=True)
def _sdk_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")  # conftest turns it off for apps


def _sdk() -> tuple[trace.TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _lean() -> tuple[trace.TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = LeanTracerProvider(RESOURCE, TracerProvider(shutdown_on_exit=False).sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _request(tracer: trace.Tracer, caller: dict[str, str]) -> None:
    """What a /query does: a server span continuing the caller, a client span, a stage
    that fails, an exception that escapes a span, attributes set late."""
    parent = TraceContextTextMapPropagator().extract(caller)
    server = tracer.start_span(
        "POST",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "POST", "tags": ("a", "b")},
    )
    with trace.use_span(server, end_on_exit=False):
        with tracer.start_as_current_span(
            "redis EVALSHA", kind=SpanKind.CLIENT, attributes={"server.port": 6390}
        ):
            pass
        with tracer.start_as_current_span("generate", attributes={"rag.temperature": 0.7}) as gen:
            gen.set_attribute("rag.completion_tokens", 12)
            gen.add_link(server.get_span_context(), {"why": "test"})
            gen.set_status(Status(StatusCode.OK))
            gen.set_status(StatusCode.ERROR, "ignored: OK is final")
        with pytest.raises(ValueError), tracer.start_as_current_span("embed"):
            raise ValueError("boom")
    server.update_name("POST /query")
    server.set_attributes({"http.route": "/query", "http.response.status_code": 200})
    server.end()
    server.end()  # a second end is ignored


def _finished(
    make: Callable[[], tuple[trace.TracerProvider, InMemorySpanExporter]],
    scenario: Callable[[trace.Tracer], None],
) -> list[ReadableSpan]:
    provider, memory = make()
    random.seed(20261121)  # both tracers draw their ids from `random`, in the same order
    scenario(provider.get_tracer("api", "9.9"))
    return list(memory.get_finished_spans())


def _timeless(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """The request with what two runs cannot share (clock readings, line numbers) blanked."""
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.start_time_unix_nano = span.end_time_unix_nano = 0
                for event in span.events:
                    event.time_unix_nano = 0
                    for attribute in event.attributes:
                        if attribute.key == "exception.stacktrace":
                            attribute.value.string_value = attribute.value.string_value[-17:]
    return request


def _wire(
    make: Callable[[], tuple[trace.TracerProvider, InMemorySpanExporter]],
    caller: dict[str, str],
) -> tuple[list[ReadableSpan], ExportTraceServiceRequest]:
    spans = _finished(make, lambda tracer: _request(tracer, caller))
    return spans, _timeless(encode_spans(spans))


@pytest.mark.parametrize("caller", [CALLER, {}], ids=["continues-the-caller", "root"])
def test_lean_spans_encode_exactly_like_the_sdks(caller: dict[str, str]):
    sdk_spans, sdk_wire = _wire(_sdk, caller)
    lean_spans, lean_wire = _wire(_lean, caller)
    assert len(lean_spans) == len(sdk_spans) == 4
    assert lean_wire == sdk_wire
    assert [s.context.trace_flags for s in lean_spans] == [s.context.trace_flags for s in sdk_spans]
    embed = next(s for s in lean_spans if s.name == "embed")
    assert embed.status.status_code is StatusCode.ERROR
    assert [e.name for e in embed.events] == ["exception"]


def test_through_the_relay_lean_spans_arrive_as_the_sdk_would_send_them():
    provider, memory = _lean()
    _request(provider.get_tracer("api", "9.9"), CALLER)
    spans = memory.get_finished_spans()
    assert same(relayed(spans), encode_spans(spans))


Decision = tuple[str, bool, bool]  # (caller, server span recorded, child sampled)


def _decisions(make: Callable[[], tuple[trace.TracerProvider, Any]]) -> list[Decision]:
    provider, memory = make()
    tracer = provider.get_tracer("api")
    random.seed(7)
    seen = []
    unsampled = {**CALLER, "traceparent": CALLER["traceparent"][:-2] + "00"}
    for label, caller in (("sampled", CALLER), ("unsampled", unsampled), ("root", {})):
        for _ in range(20):
            parent = TraceContextTextMapPropagator().extract(caller)
            with (
                tracer.start_as_current_span("server", context=parent) as server,
                tracer.start_as_current_span("child") as child,
            ):
                sampled = child.get_span_context().trace_flags.sampled
                seen.append((label, server.is_recording(), sampled))
    assert len(memory.get_finished_spans()) == 2 * sum(s for _, s, _ in seen)
    return seen


@pytest.mark.parametrize(
    "sampler,argument",
    [
        ("parentbased_always_on", ""),
        ("always_on", ""),
        ("always_off", ""),
        ("traceidratio", "0.5"),
        ("parentbased_traceidratio", "0.5"),
        ("parentbased_always_off", ""),
    ],
)
def test_sampling_decisions_match_the_sdk(monkeypatch: pytest.MonkeyPatch, sampler, argument):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", argument)
    lean = _decisions(_lean)
    assert lean == _decisions(_sdk)
    if sampler.endswith("ratio"):  # the ratio samplers really do sample some and not others
        roots = [s for parent, s, _ in lean if parent == "root"]
        assert 0 < sum(roots) < len(roots)


class _OnlyRoots(StaticSampler):
    """Says "always on", but samples root spans only: the tracer must ask it."""

    def __init__(self) -> None:
        super().__init__(sampling.Decision.RECORD_AND_SAMPLE)

    def should_sample(self, parent_context, *args: Any, **kwargs: Any) -> SamplingResult:
        if trace.get_current_span(parent_context).get_span_context().is_valid:
            return SamplingResult(sampling.Decision.DROP)
        return super().should_sample(parent_context, *args, **kwargs)


@pytest.mark.parametrize(
    "sampler",
    [
        _OnlyRoots(),
        ParentBased(ALWAYS_ON, local_parent_sampled=_OnlyRoots()),
    ],
    ids=["a subclass of the fixed sampler", "parent-based with its own delegates"],
)
def test_a_sampler_of_ones_own_is_asked(sampler: Sampler):
    """The tracer answers for the SDK's fixed and parent-based samplers without calling
    them; any other sampler, even one that looks like them, decides for itself."""
    lean = LeanTracerProvider(RESOURCE, sampler)
    sdk = TracerProvider(resource=RESOURCE, sampler=sampler, shutdown_on_exit=False)
    for provider in (lean, sdk):
        tracer = provider.get_tracer("api")
        with (
            tracer.start_as_current_span("root") as root,
            tracer.start_as_current_span("child") as child,
        ):
            assert root.get_span_context().trace_flags.sampled
            assert not child.get_span_context().trace_flags.sampled


def test_the_relay_keeps_the_sign_of_zero():
    """Attribute encodings are remembered across spans, and 0.0 == -0.0 as a dict key:
    the relay must still write each span's own."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("api")
    for value in (0.0, -0.0, 1, True, "x" * 300, "x" * 300):
        tracer.start_span("s", attributes={"value": value}).end()
    spans = memory.get_finished_spans()
    assert same(relayed(spans), encode_spans(spans))


def test_the_relay_applies_the_limits_as_the_sdk_does(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "5")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "2")
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "1")

    def make(tracer: trace.Tracer) -> None:
        attributes: dict[str, AnyValue] = {
            "oldest goes": True,
            "n": 1,
            "long": "abcdefghij",
            "tags": ["abcdefg"],
        }
        with tracer.start_as_current_span("s", attributes=attributes) as span:
            span.add_event("first")
            span.add_event("second", {"k": "v"})

    lean_sent = relayed(_finished(_lean, make))
    assert same(_timeless(lean_sent), _timeless(encode_spans(_finished(_sdk, make))))
    (span,) = lean_sent.resource_spans[0].scope_spans[0].spans
    assert [a.key for a in span.attributes] == ["long", "tags"]  # the newest two, cut to 5
    assert span.attributes[0].value.string_value == "abcde"
    assert span.dropped_attributes_count == 2 and span.dropped_events_count == 1


def test_odd_values_scopes_and_remote_links_arrive_as_the_sdk_sends_them():
    remote = TraceContextTextMapPropagator().extract(CALLER)
    remote_context = trace.get_current_span(remote).get_span_context()

    def scenario(_: trace.Tracer, provider: trace.TracerProvider) -> None:
        tracer = provider.get_tracer("httpx", "0.1", "https://opentelemetry.io/schemas/1.11.0")
        odd: dict[str, Any] = {
            "none": None,
            "list with none": ["a", None],
            "bytes": b"\x00\xff",
            "beyond 64 bits": 2**64,
            "map": {"a": None, "b": 1},
            "no str": object(),
            "tuple": (1, 2),
        }
        with tracer.start_as_current_span("s", attributes=odd) as span:
            span.add_link(remote_context, {"why": "caller"})

    sent = []
    for make in (_lean, _sdk):
        provider, memory = make()
        random.seed(5)
        scenario(provider.get_tracer("api"), provider)
        sent.append(list(memory.get_finished_spans()))
    lean = relayed(sent[0])
    assert same(_timeless(lean), _timeless(encode_spans(sent[1])))
    scope_spans = lean.resource_spans[0].scope_spans[0]
    assert scope_spans.schema_url.endswith("1.11.0")
    (link,) = scope_spans.spans[0].links
    assert link.flags & 0x200  # the link's span is remote
    keys = [a.key for a in scope_spans.spans[0].attributes]
    assert "beyond 64 bits" not in keys and "bytes" in keys  # one key lost, not the span


def test_a_string_that_is_not_unicode_costs_its_key_not_the_span():
    """OTLP strings are UTF-8: a lone surrogate (an exception message quoting bad input)
    cannot be sent. The SDK's encoder fails its whole batch on one; the relay drops the
    key."""
    provider, memory = _lean()
    with provider.get_tracer("api").start_as_current_span("s") as span:
        span.set_attributes({"bad": "caf\udce9", "good": "café"})
        span.add_event("e", {"bad": "\ud800", "kept": 1})
    (sent,) = relayed(list(memory.get_finished_spans())).resource_spans[0].scope_spans[0].spans
    assert [(a.key, a.value.string_value) for a in sent.attributes] == [("good", "café")]
    assert [a.key for a in sent.events[0].attributes] == ["kept"]


def test_with_no_processor_spans_are_contexts_that_still_carry_the_trace():
    """No exporter configured: nothing is recorded, but ids for the logs are made and the
    caller's trace continues through parent and child."""
    provider = LeanTracerProvider(Resource.create({}), TracerProvider().sampler)
    tracer = provider.get_tracer("api")
    parent = TraceContextTextMapPropagator().extract(CALLER)
    with (
        tracer.start_as_current_span("server", context=parent) as server,
        tracer.start_as_current_span("child") as child,
    ):
        assert not server.is_recording() and not child.is_recording()
        ids = server.get_span_context(), child.get_span_context()
        assert all(c.is_valid and c.trace_flags.sampled for c in ids)
        assert ids[0].trace_id == ids[1].trace_id == int(CALLER["traceparent"][3:35], 16)
        assert trace.get_current_span().get_span_context() == ids[1]
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracer.start_as_current_span("recorded") as span:
        assert span.is_recording()
    assert [s.name for s in memory.get_finished_spans()] == ["recorded"]

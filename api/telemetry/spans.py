"""A lean OpenTelemetry tracer: the API's TracerProvider, Tracer and Span, built for the
hot path, with the SDK kept for everything that is not per span.

Why not the SDK's own `Tracer`: a cached answer is ~350 µs of work, and the SDK spends
~18 µs on each span before it is exported — sampler result objects, attribute validation
into a locked `BoundedAttributes`, a multi-processor fan-out, internal metrics — and in a
busy worker, with cold caches, about twice that (docs/BENCHMARKS.md). This span is a
plain record: ids, times, a dict of attributes. The SDK still does the rest:

- sampling: the sampler is the SDK's, built from OTEL_TRACES_SAMPLER(_ARG); it decides
  every root span and every span under a remote parent. Under a local parent a
  parent-based sampler (the default) takes the parent's decision without a call;
- batching: finished spans go to the span processors (the relay's, or the SDK's
  `BatchSpanProcessor` without the relay), which keep the OTEL_BSP_* rules;
- export: finished spans read like the SDK's `ReadableSpan`, so both the span relay and
  the SDK's OTLP exporter take them as they are. Attribute limits (OTEL_SPAN_*_LIMIT)
  are applied by the relay, off the request path; a process without the relay (a bare
  uvicorn, the tests) exports through the SDK's exporter directly, without them.

Without a span processor (no exporter configured) spans are not recorded at all: they
are contexts, which still put trace and span ids in the logs and propagate the trace.

The instrumentations (httpx) see an ordinary API tracer. Two things the SDK offers are
left out because nothing here uses them: span processors get `on_end` only (the batch
processor's `on_start` does nothing), and `start_as_current_span` is a context manager,
not also a decorator.
"""

from __future__ import annotations

import atexit
import random
import time
import traceback
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, SpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    StaticSampler,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util import types

_FLAGS = {  # (sampled, random trace id) -> flags, as the SDK sets them
    (sampled, random_id): TraceFlags(
        (TraceFlags.SAMPLED if sampled else 0) | (TraceFlags.RANDOM_TRACE_ID if random_id else 0)
    )
    for sampled in (False, True)
    for random_id in (False, True)
}
_UNSET = Status(StatusCode.UNSET)
_getrandbits = random.getrandbits  # reseeded in every forked worker by the random module
_now = time.time_ns


class LeanSpan(trace.Span):
    """A recording span. Once ended it is also the read-only view the exporters read
    (the fields of the SDK's `ReadableSpan`)."""

    __slots__ = (
        "_record_exception",
        "_set_status_on_exception",
        "_tracer",
        "attributes",
        "context",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
    )
    dropped_attributes = dropped_events = dropped_links = 0

    def __init__(  # noqa: PLR0917  # positional: keyword passing costs, once per span
        self,
        tracer: LeanTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link],
        start_time: int | None,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = (
            [link for link in links if _valid_link(link.context, link.attributes)] if links else []
        )
        self.events: list[Event] = []
        self.status = _UNSET
        self.start_time = start_time or _now()
        self.end_time: int | None = None
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception

    @property
    def resource(self) -> Resource:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._tracer.scope

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self.end_time is None:
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self.end_time is None:
            self.attributes.update(attributes)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.end_time is None:  # copied: the caller may reuse its dict
            self.events.append(Event(name, dict(attributes or {}), timestamp or _now()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self.end_time is None and _valid_link(context, attributes):
            self.links.append(Link(context, dict(attributes or {})))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET never overrides.
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        name = kind.__qualname__ if module in ("builtins", "") else f"{module}.{kind.__qualname__}"
        fields: dict[str, Any] = {
            "exception.type": name,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        fields.update(attributes or {})
        self.add_event("exception", fields, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time or _now()
        for processor in self._tracer.processors:
            processor.on_end(self)  # type: ignore[arg-type]  # reads like a ReadableSpan

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # Any exception, as the SDK's Span.__exit__ (use_span, below, takes Exception only).
        if exc_val is not None and self.end_time is None:
            _failed(self, exc_val, self._record_exception, self._set_status_on_exception, True)
        self.end()


def _valid_link(context: SpanContext, attributes: types.Attributes) -> bool:
    """The SDK's rule: a link needs a valid context, or at least attributes or a state."""
    return bool(context and (context.is_valid or attributes or context.trace_state))


def _failed(
    span: trace.Span, exc: BaseException, record: bool, set_status: bool, escaped: bool
) -> None:
    # `escaped` as the SDK has it: True from a span's own __exit__, False from use_span.
    if record:
        span.record_exception(exc, escaped=escaped)
    if set_status:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class _Current:
    """`start_as_current_span`'s context manager: the API's `use_span` as a class, not a
    generator (half the cost), with the same exception rules."""

    __slots__ = ("end_on_exit", "record", "set_status", "span", "token")

    def __init__(self, span: trace.Span, end_on_exit: bool, record: bool, set_status: bool) -> None:
        self.span = span
        self.end_on_exit = end_on_exit
        self.record = record
        self.set_status = set_status

    def __enter__(self) -> trace.Span:
        self.token = context_api.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        context_api.detach(self.token)
        if isinstance(exc_val, Exception) and self.span.is_recording():
            _failed(self.span, exc_val, self.record, self.set_status, False)
        if self.end_on_exit:
            self.span.end()


def _static(sampler: Sampler) -> tuple[bool, bool] | None:
    """(sampled, recording) if `sampler` answers the same for every span, else None. The
    SDK's own class only: a subclass may answer otherwise."""
    if type(sampler) is StaticSampler:
        decision = sampler._decision
        return decision.is_sampled(), decision.is_recording()  # type: ignore[no-untyped-call]
    return None


def _follows_local_parents(sampler: Sampler) -> bool:
    """The SDK's parent-based sampler as OTEL_TRACES_SAMPLER builds it: under a local
    parent it takes the parent's decision. Not one with other delegates, or a subclass
    that decides for itself."""
    return (
        isinstance(sampler, ParentBased)
        and type(sampler).should_sample is ParentBased.should_sample
        and sampler._local_parent_sampled is ALWAYS_ON
        and sampler._local_parent_not_sampled is ALWAYS_OFF
    )


class LeanTracer(trace.Tracer):
    def __init__(self, provider: LeanTracerProvider, scope: InstrumentationScope) -> None:
        self.scope = scope
        self.resource = provider.resource
        self.processors = provider.processors  # shared list: processors added later count
        self._sampler = sampler = provider.sampler
        self._parent_based = _follows_local_parents(sampler)
        self._root: tuple[bool, bool] | None = None  # a root span's fixed answer, if any
        self._fixed: tuple[bool, bool] | None = None  # every span's fixed answer, if any
        if self._parent_based:
            self._root = _static(sampler._root)  # type: ignore[attr-defined]
        elif not isinstance(sampler, ParentBased):
            # always_on / always_off on their own: one answer for every span.
            self._root = self._fixed = _static(sampler)

    def start_span(  # noqa: PLR0917  # the API's signature
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        else:
            parent = None
            trace_id = _getrandbits(128) or 1
            random_id = True
        span_attributes = dict(attributes) if attributes else {}
        if parent is not None and not parent.is_remote and self._parent_based:
            # What the parent-based sampler answers under a local parent, without the call.
            sampled = recording = parent.trace_flags.sampled
            state: TraceState | None = parent.trace_state
        elif self._fixed is not None:
            # What a fixed sampler answers, without the call: its decision, and the
            # parent's trace state carried on.
            sampled, recording = self._fixed
            state = parent.trace_state if parent is not None else None
        elif parent is None and self._root is not None:
            # A root under an always-on or always-off sampler (the default is always-on
            # under parent-based): its answer is fixed, without the call.
            sampled, recording = self._root
            state = None
        else:
            result = self._sampler.should_sample(
                context, trace_id, name, kind, attributes, links or ()
            )
            sampled = result.decision.is_sampled()  # type: ignore[no-untyped-call]
            recording = result.decision.is_recording()  # type: ignore[no-untyped-call]
            state = result.trace_state
            if result.attributes:
                span_attributes.update(result.attributes)
        span_context = SpanContext(
            trace_id, _getrandbits(64) or 1, False, _FLAGS[sampled, random_id], state
        )
        if not recording or not self.processors:
            # With no processor to receive it (no exporter configured), a recorded span
            # would be work no one reads: its context still gives logs their ids and
            # carries the trace on to what is called next.
            return NonRecordingSpan(span_context)
        return LeanSpan(
            self,
            name,
            span_context,
            parent,
            kind,
            span_attributes,
            links or (),
            start_time,
            record_exception,
            set_status_on_exception,
        )

    # The API declares a generator-based context manager; a class does the same for less.
    def start_as_current_span(  # type: ignore[override]  # noqa: PLR0917
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _Current:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        return _Current(span, end_on_exit, record_exception, set_status_on_exception)


class LeanTracerProvider(trace.TracerProvider):
    def __init__(self, resource: Resource, sampler: Sampler) -> None:
        self.resource = resource
        self.sampler = sampler
        self.processors: list[SpanProcessor] = []
        self._tracers: dict[tuple[str, str | None, str | None], LeanTracer] = {}
        atexit.register(self.shutdown)

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """The processor's `on_end` receives every finished span; `on_start` is not called."""
        self.processors.append(processor)

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer:
        key = (instrumenting_module_name, instrumenting_library_version, schema_url)
        if key not in self._tracers:
            scope = InstrumentationScope(
                instrumenting_module_name, instrumenting_library_version, schema_url, attributes
            )
            self._tracers[key] = LeanTracer(self, scope)
        return self._tracers[key]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()
        self.processors.clear()

# The interface of spans.pyx (compiled), for type checkers.
from collections.abc import Sequence
from contextvars import Token
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, SpanProcessor
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util import types

def current_context() -> Context: ...
def attach(context: Context) -> Token[Context]: ...
def detach(token: Token[Context]) -> None: ...
def with_span(span: trace.Span, context: Context | None) -> Context: ...
def current_span(context: Context | None) -> trace.Span: ...
def plain(attributes: Any) -> dict[str, Any]: ...

UNSET_STATUS: Status

class LeanSpan(trace.Span):
    name: str
    context: SpanContext
    parent: SpanContext | None
    kind: SpanKind
    attributes: dict[str, Any]
    events: Sequence[Event]  # the empty tuple until the first
    links: Sequence[Link]
    status: Status
    start_time: int
    end_time: int | None
    @property
    def dropped_attributes(self) -> int: ...
    @property
    def dropped_events(self) -> int: ...
    @property
    def dropped_links(self) -> int: ...
    @property
    def resource(self) -> Resource: ...
    @property
    def instrumentation_scope(self) -> InstrumentationScope: ...
    def get_span_context(self) -> SpanContext: ...
    def is_recording(self) -> bool: ...
    def set_attribute(self, key: str, value: types.AnyValue) -> None: ...
    def set_attributes(self, attributes: types.Attributes) -> None: ...
    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None: ...
    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None: ...
    def update_name(self, name: str) -> None: ...
    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None: ...
    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None: ...
    def end(self, end_time: int | None = None) -> None: ...
    def row(self) -> list[Any]: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None: ...

class _Current:
    def __enter__(self) -> trace.Span: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None: ...

class LeanTracer(trace.Tracer):
    scope: InstrumentationScope
    resource: Resource
    processors: list[SpanProcessor]
    scope_row: tuple[Any, ...]
    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = ...,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span: ...
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = ...,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _Current: ...

class LeanTracerProvider(trace.TracerProvider):
    resource: Resource
    sampler: Sampler
    processors: list[SpanProcessor]
    def __init__(self, resource: Resource, sampler: Sampler) -> None: ...
    def add_span_processor(self, processor: SpanProcessor) -> None: ...
    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer: ...
    def force_flush(self, timeout_millis: int = 30000) -> bool: ...
    def shutdown(self) -> None: ...

"""OpenTelemetry tracing, set up once per worker process after the fork.

The span processor runs a thread and the exporter holds connections: neither
survives a fork, so this runs from the app's start-up, never at import. Configuration is
the standard environment: OTEL_SDK_DISABLED, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER(_ARG),
OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT (OTLP over HTTP, e.g. Jaeger on :4318).
"""

from __future__ import annotations

import os
import socket

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from api import __version__
from api.telemetry.spans import LeanTracerProvider, current_span

_provider: LeanTracerProvider | None = None
_tracer: trace.Tracer = trace.get_tracer("api")  # no-op until setup_tracing
_exporting = False  # set once by setup_tracing; read on every observation


def enabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"


def exporting() -> bool:
    return enabled() and bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing() -> LeanTracerProvider | None:
    """Once per process. Without an OTLP endpoint spans are contexts only, not recorded:
    logs carry their ids and the trace is propagated, but nothing is kept that no one
    would read. With OTEL_SDK_DISABLED=true nothing is made at all."""
    global _provider, _exporting, _tracer
    if _provider is not None or not enabled():
        return _provider
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "rag-api"),
            "service.version": __version__,
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    # The SDK builds the sampler from OTEL_TRACES_SAMPLER(_ARG); spans are made by the
    # lean provider (api/telemetry/spans.py).
    sampler = TracerProvider(shutdown_on_exit=False).sampler
    provider = LeanTracerProvider(resource, sampler)
    _exporting = exporting()
    if _exporting:
        provider.add_span_processor(_processor())
    trace.set_tracer_provider(provider)
    # Every httpx client (Chroma over HTTP, the LLM) gets client spans; Redis calls get
    # theirs from api/cache.py.
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    _tracer = provider.get_tracer("api", __version__)
    return provider


def _processor() -> SpanProcessor:
    """Under gunicorn the master's span relay encodes and sends (api/telemetry/relay.py);
    a process on its own (tests, a bare uvicorn) exports OTLP/HTTP itself."""
    from api.telemetry.relay import SOCKET_ENV, RelaySpanProcessor

    if path := os.environ.get(SOCKET_ENV):
        return RelaySpanProcessor(path)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter())


def shutdown_tracing() -> None:
    """Flush what the span processor still holds (a worker's graceful exit)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)


def tracer() -> trace.Tracer:
    """The service's own tracer: the provider's, not the API's proxy, whose
    start_as_current_span adds a generator per span."""
    return _tracer


def current_trace_id() -> str | None:
    """The trace id to put in an exemplar: only for sampled spans that are exported."""
    context = current_span(None).get_span_context()
    if _exporting and context.is_valid and context.trace_flags.sampled:
        return format(context.trace_id, "032x")
    return None

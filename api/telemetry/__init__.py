"""Logs, metrics and traces: set up here, recorded by the middleware and by `stage()`.

Service code marks its stages (`with stage(...)`), notes facts about the request
(`note(cached=True)`) and counts events (`count`, or `counted` on a path every request
takes); everything else — request ids, RED metrics, the access log, spans
for HTTP, Redis, Chroma and the LLM — is recorded without it knowing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry.trace import Span
from prometheus_client import Counter, Gauge, Histogram

from api.telemetry import metrics, tallies
from api.telemetry.logs import configure_logging, gunicorn_logconfig
from api.telemetry.tallies import Counted, Series, Tally
from api.telemetry.traces import current_trace_id, setup_tracing, shutdown_tracing, tracer

__all__ = [
    "child",
    "configure_logging",
    "count",
    "counted",
    "current_trace_id",
    "enable_metrics",
    "gunicorn_logconfig",
    "metrics",
    "metrics_enabled",
    "note",
    "observe",
    "series",
    "setup_tracing",
    "shutdown_tracing",
    "stage",
    "tracer",
]

# Facts about the current request for its access log line, filled in by service code.
request_notes: ContextVar[dict[str, Any] | None] = ContextVar("request_notes", default=None)


def enable_metrics(on: bool) -> None:
    tallies.enable(on)  # the one switch, read by the compiled code as a C call


def metrics_enabled() -> bool:
    return tallies.enabled()


def note(**fields: Any) -> None:
    notes = request_notes.get()
    if notes is not None:
        notes.update(fields)


_children: dict[tuple[Any, ...], Tally] = {}


def child(metric: Counter | Gauge, **labels: str) -> Tally:
    """The value of `metric.labels(**labels)`, as a Tally (api/telemetry/tallies.pyx) and
    remembered: prometheus_client takes a lock and rebuilds the label tuple on every call,
    a few µs on every request. Label values here are bounded (routes, methods, status
    codes, layers), as they must be for Prometheus."""
    key = (metric, *labels.items())
    found = _children.get(key)
    if found is None:
        labelled = metric.labels(**labels) if labels else metric
        found = _children[key] = Tally(labelled._value)
    return found


def counted(counter: Counter, **labels: str) -> Counted:
    """`count(counter, **labels)` for a path that runs on every request: made once (at
    import), its `inc` is a C call."""
    return Counted(functools.partial(child, counter, **labels))


_series: dict[tuple[Any, ...], Series] = {}


def series(histogram: Histogram, **labels: str) -> Series:
    """The labelled series of `histogram`, remembered, as `child` does for counters."""
    key = (histogram, *labels.items())
    found = _series.get(key)
    if found is None:
        found = _series[key] = Series(histogram, labels, metrics.EXEMPLARS)
    return found


def observe(histogram: Histogram, value: float, **labels: str) -> None:
    """Record a duration, with the current trace as its exemplar when there is one."""
    if tallies.enabled():
        series(histogram, **labels).observe(value, current_trace_id())


def count(counter: Counter, amount: float = 1, **labels: str) -> None:
    if amount < 0:  # as prometheus_client's Counter.inc: a counter only goes up
        raise ValueError(f"counters only go up; {amount} given")
    if tallies.enabled():
        child(counter, **labels).inc(amount)


@contextmanager
def stage(
    name: str,
    histogram: Histogram,
    labels: dict[str, str] | None = None,
    attributes: dict[str, Any] | None = None,
) -> Iterator[Span]:
    """A span named `name` and a duration in `histogram` for one step of the work."""
    start = time.perf_counter()
    with tracer().start_as_current_span(name, attributes=attributes) as span:
        try:
            yield span
        finally:
            observe(histogram, time.perf_counter() - start, **(labels or {}))

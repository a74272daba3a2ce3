"""The telemetry's compiled modules (api/telemetry/*.pyx, and otlp.py compiled as it is;
built by `pip install -e .`): what the tests run must be built from the sources beside it."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

TELEMETRY = Path(__file__).resolve().parent.parent / "api" / "telemetry"
# A .py compiled as it is: its .so is what imports, so a stale one would hide an edit.
SOURCES = sorted([*TELEMETRY.glob("*.pyx"), TELEMETRY / "otlp.py"])


def test_every_source_is_a_module_the_project_builds() -> None:
    built = Path(__file__).resolve().parent.parent.joinpath("pyproject.toml").read_text()
    assert SOURCES
    for source in SOURCES:
        assert f'sources = ["api/telemetry/{source.name}"]' in built, source.name


def test_the_per_request_objects_are_only_made_by_their_factories() -> None:
    """Made directly, their C fields would be empty: a TypeError instead of a crash."""
    from api.telemetry.recording import Request
    from api.telemetry.spans import LeanSpan

    for kind in (Request, LeanSpan):
        with pytest.raises(TypeError, match="is made by"):
            kind()


def test_a_counter_refuses_to_go_down() -> None:
    from api import telemetry
    from api.telemetry import metrics

    with pytest.raises(ValueError, match="only go up"):
        telemetry.count(metrics.ERRORS, -1, type="internal")


def test_a_counted_series_adds_where_count_adds_and_is_found_once_when_first_counted() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from api import telemetry
    from api.telemetry import flusher, tallies

    counter = Counter("hits", "h", ["layer"], registry=CollectorRegistry())
    found: list[str] = []

    def resolver(name: str) -> Callable[[], tallies.Tally]:
        def resolve() -> tallies.Tally:
            found.append(name)
            return telemetry.child(counter, layer="answer")

        return resolve

    counted = tallies.Counted(resolver("on"))
    only_off = tallies.Counted(resolver("off"))  # counted only while metrics are off
    with flusher._running:  # no flusher thread writes in between
        assert found == []  # made at import: nothing is looked up until it counts
        counted.inc()
        counted.inc(2)
        telemetry.count(counter, 4, layer="answer")
        telemetry.counted(counter, layer="answer").inc(8)
        assert found == ["on"]
        with pytest.raises(ValueError, match="only go up"):
            counted.inc(-1)
        telemetry.enable_metrics(False)
        try:
            counted.inc(16)
            only_off.inc(32)
            with pytest.raises(ValueError, match="only go up"):  # as count(), on or off
                only_off.inc(-1)
        finally:
            telemetry.enable_metrics(True)
        tallies.flush()
    assert found == ["on"]  # nothing was looked up while metrics were off
    assert counter.labels(layer="answer")._value.get() == 15


def test_the_request_recorder_follows_the_metrics_switch() -> None:
    """The compiled recorder reads the switch enable_metrics sets: off, a request makes
    no duration series; on, it does."""
    from starlette.types import Message

    from api import telemetry
    from api.telemetry import recording

    class Route:
        path = "/metrics-switch-probe"

    scope = {"type": "http", "path": Route.path, "method": "GET", "headers": [], "route": Route}

    async def send(message: Message) -> None:
        pass

    def series_made() -> bool:
        return any(Route.path in repr(key) for key in telemetry._series)

    recorder = recording.Recorder(access_log_on=False, tracing_on=False)
    telemetry.enable_metrics(False)
    try:
        recorder.begin(scope, send).finish(scope)
    finally:
        telemetry.enable_metrics(True)
    assert not series_made()
    recorder.begin(scope, send).finish(scope)
    assert series_made()


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_the_compiled_module_is_not_older_than_its_sources(source: Path) -> None:
    module = importlib.import_module(f"api.telemetry.{source.stem}")
    compiled = Path(module.__file__ or "")
    assert compiled.suffix == ".so", f"{source.name} is not compiled: run `make install`"
    text = source.read_text()
    used = [
        pxd
        for pxd in TELEMETRY.glob("*.pxd")
        if f"{pxd.stem} cimport" in text or pxd.stem == source.stem  # its own declarations
    ]
    newest = max(path.stat().st_mtime for path in [source, *used])
    assert compiled.stat().st_mtime >= newest, (
        f"{compiled.name} is older than its sources: run `make install` (pip install -e .)"
    )


def test_a_span_context_is_the_tuple_the_compiled_code_reads() -> None:
    """The compiled modules read a SpanContext's fields as tuple items, by the positions
    in api/telemetry/spancontext.pxd, not through its properties (each a Python call). An
    OpenTelemetry API that laid them out otherwise must fail here, not mislabel spans."""
    from opentelemetry.trace import SpanContext, TraceFlags, TraceState

    state = TraceState([("vendor", "value")])
    context = SpanContext(0xABC, 0xDEF, True, TraceFlags(TraceFlags.SAMPLED | 2), state)
    layout = (TELEMETRY / "spancontext.pxd").read_text()
    positions = {
        name: int(value.split("#")[0])
        for name, value in (
            line.strip().split(" = ") for line in layout.splitlines() if " = " in line
        )
        if name.isupper()
    }
    bits = {name: positions.pop(name) for name in ("SAMPLED", "RANDOM_TRACE_ID")}
    assert bits == {
        "SAMPLED": TraceFlags.SAMPLED,
        "RANDOM_TRACE_ID": TraceFlags.RANDOM_TRACE_ID,
    }
    assert positions == {
        "TRACE_ID": 0,
        "SPAN_ID": 1,
        "IS_REMOTE": 2,
        "TRACE_FLAGS": 3,
        "TRACE_STATE": 4,
        "IS_VALID": 5,
    }
    for name, index in positions.items():
        assert context[index] is getattr(context, name.lower())
    # The two booleans told apart: remote but not valid.
    remote_invalid = SpanContext(0, 0xDEF, True)
    assert remote_invalid[positions["IS_REMOTE"]] is True
    assert remote_invalid[positions["IS_VALID"]] is False
    assert context.trace_flags.sampled and context.trace_flags.random_trace_id


def test_the_compiled_otlp_writer_writes_what_the_interpreted_one_does() -> None:
    """otlp.py runs compiled; the same source interpreted must agree byte for byte, on
    values its annotations name but not exactly: a str subclass (StrEnum) and a dict
    subclass (OrderedDict). Compiled with annotation typing on, both raised TypeError."""
    import collections
    import enum
    import importlib.util

    from api.telemetry import otlp

    spec = importlib.util.spec_from_file_location("otlp_interpreted", TELEMETRY / "otlp.py")
    assert spec is not None and spec.loader is not None
    interpreted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interpreted)
    assert Path(otlp.__file__ or "").suffix == ".so"

    class Color(enum.StrEnum):
        RED = "red"

    attributes = collections.OrderedDict(color=Color.RED, none=None, n=3)
    row = [
        "span", "ab" * 16, "cd" * 8, 1, "", None, False, 1, 10, 20, attributes,
        0, None, [["event", 15, dict(attributes)]], [], "scope", None, None, {},
    ]  # fmt: skip
    message = {"resource": {"service.name": "x"}, "resource_schema_url": None, "spans": [row]}
    assert otlp.encode_request(message) == interpreted.encode_request(message)


def test_a_non_recording_span_keeps_its_context_where_the_compiled_code_reads_it() -> None:
    """spans.pyx reads a NonRecordingSpan's context from `_context` (a Python call less
    for every span under a remote parent, or with no parent at all)."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    context = SpanContext(0xABC, 0xDEF, True)
    span = NonRecordingSpan(context)
    assert span._context is context
    assert span.get_span_context() is context


def test_a_forked_child_starts_with_nothing_pending() -> None:
    """Sums recorded before a fork are the parent's to write: a gunicorn worker forked
    from a master that had counted something must not count it again."""
    from prometheus_client import CollectorRegistry, Histogram

    from api.telemetry import flusher, metrics, tallies

    class Value:
        def __init__(self) -> None:
            self.value = 0.0

        def inc(self, amount: float) -> None:
            self.value += amount

    value = Value()
    tally = tallies.Tally(value)
    histogram = Histogram("f_seconds", "f", buckets=(1,), registry=CollectorRegistry())
    series = tallies.Series(histogram, {}, metrics.Exemplars(None))
    with flusher._running:  # an earlier test's flusher thread must not flush in between
        tally.inc(5)
        series.observe(0.5, None)
        pid = os.fork()
        if pid == 0:  # the child: nothing of the parent's to write
            try:
                tallies.flush()
                written = value.value, histogram._sum.get(), [b.get() for b in histogram._buckets]
                os._exit(0 if written == (0.0, 0.0, [0.0, 0.0]) else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        tallies.flush()
        assert value.value == 5
        assert histogram._sum.get() == 0.5


def test_a_lean_spans_context_is_the_span_context_the_api_would_make() -> None:
    """spans.pyx makes a span's SpanContext with the type's own allocator, as
    tuple.__new__ does, without SpanContext.__new__: it must be the same object in every
    way the API and its users can tell."""
    import gc
    import pickle

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanContext, TraceFlags
    from opentelemetry.trace.span import DEFAULT_TRACE_STATE

    from api.telemetry.spans import LeanTracerProvider

    provider = LeanTracerProvider(Resource({}), TracerProvider().sampler)
    context = provider.get_tracer("t").start_span("s").get_span_context()
    made = SpanContext(
        context.trace_id, context.span_id, False, TraceFlags(context.trace_flags), None
    )
    assert type(context) is SpanContext and context == made
    assert gc.is_tracked(context) == gc.is_tracked(made)  # a container, as tuple.__new__ makes
    assert context.trace_state is DEFAULT_TRACE_STATE and context.is_valid
    assert not context.is_remote and repr(context) == repr(made)
    assert pickle.loads(pickle.dumps(context)) == made

"""The service's app run inside a benchmark's own process, with what a worker has around it
(an OTLP sink, the span relay, Redis), and its telemetry switched on and off while it
runs. benchmarks/components.py times it; benchmarks/instructions.py counts it. Run these
in a fresh interpreter: the telemetry modules read their environment once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.servers import ROOT, RedisServer, free_port

# Each setting's telemetry: the access log ("l"), metrics ("m"), traces ("t"). "off, again"
# is the control: the same setting measured as if it were another, so the gap between the
# two offs is what an instrument cannot resolve.
SETTINGS = {
    "off": "",
    "off, again": "",
    "access log": "l",
    "metrics": "m",
    "traces": "t",
    "everything": "lmt",
}
_SINK = (
    "from http.server import ThreadingHTTPServer; from benchmarks.overhead import _Sink; "
    "ThreadingHTTPServer(('127.0.0.1', {port}), _Sink).serve_forever()"
)


@contextmanager
def surroundings() -> Iterator[tuple[Path, str, int]]:
    """An OTLP sink in another process, a span relay and Redis, and the environment that
    points this process's telemetry at them (traces sampled at 100%). Yields a scratch
    directory, Redis's URL and the relay's pid."""
    with ExitStack() as cleanup:  # whatever started is stopped, even if the rest fails
        port = free_port()
        sink = subprocess.Popen([sys.executable, "-c", _SINK.format(port=port)], cwd=ROOT)
        cleanup.callback(sink.kill)
        tmp = Path(tempfile.mkdtemp())
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        os.environ.update(
            PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"),
            OTEL_SDK_DISABLED="false",
            OTEL_TRACES_SAMPLER="always_on",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        )
        (tmp / "metrics").mkdir()
        from api.telemetry.relay import SOCKET_ENV, Relay

        relay = Relay()
        cleanup.callback(relay.stop)
        os.environ[SOCKET_ENV] = relay.path
        redis_server = RedisServer(tmp / "redis")
        cleanup.callback(redis_server.stop)
        redis_server.start()
        yield tmp, redis_server.url, relay.process.pid


def app(data: Path, redis_url: str) -> Any:
    """The service's app on the sample corpus, its store in `data` (ingested at start-up
    if empty), answering from Redis, with JSON logs, which go to /dev/null with the rest
    of sys.stderr: a caller that wants its errors seen writes them to sys.__stderr__."""
    from api.config import Settings
    from api.main import create_app

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    return create_app(
        Settings(
            data_dir=data,
            model_dir=ROOT / "models",
            documents_dir=ROOT / "documents",
            redis_url=redis_url,
            generator="extractive",
            log_format="json",
        )
    )


def switches(started: Any) -> Callable[[str], None]:
    """`configure(flags)` for an app whose lifespan has started (its middleware stack is
    built then): turns its telemetry on and off as it runs. With traces off the tracer is
    the no-op one, so a Redis call still asks it for a span, which a worker started with
    OTEL_SDK_DISABLED=true does too."""
    from opentelemetry.trace import NoOpTracer

    from api import telemetry
    from api.middleware import RequestTelemetry
    from api.telemetry import traces

    middleware = started.middleware_stack
    while not isinstance(middleware, RequestTelemetry):
        middleware = middleware.app
    real_tracer = traces._tracer

    def configure(flags: str) -> None:
        middleware.recorder.access_log_on = "l" in flags
        middleware.recorder.tracing_on = "t" in flags
        telemetry.enable_metrics("m" in flags)
        traces._tracer = real_tracer if "t" in flags else NoOpTracer()

    return configure


def settle() -> None:
    """What a batch deferred is charged to it, not to the next: queued log lines and
    metric increments written (and exemplars, which a worker writes only once a second:
    a metrics batch pays for one write more than it would), queued spans sent to the
    relay."""
    from api.telemetry import flusher, traces

    flusher.flush()
    assert traces._provider is not None, "tracing is not set up"
    traces._provider.force_flush()

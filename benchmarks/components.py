"""`make bench`, part: what each kind of telemetry costs a cached `/query`, in CPU.

Through gunicorn and wrk the answer wanders by ±20 µs from run to run on this machine, more
than a log line costs. So this drives the ASGI app in-process on uvloop, as a worker does
(no HTTP server, no client), and toggles one kind of telemetry at a time on the same running
app, in short alternating batches. It reports the median CPU per request of each setting:
everything off, the access log alone, metrics alone (no exemplars: they need a sampled
trace), traces alone (exported through a real span relay to a sink in another process), and
everything. The CPU counted is this process's and the span relay's, reported apart. What it
cannot show is the extra cost of the same code in a busy worker with cold caches; the wrk
benchmarks (overhead.py) do.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.overhead import QUESTION, cpu_seconds
from tests.servers import ROOT, RedisServer, free_port

# "off, again" is the control: the same setting measured as if it were another, so the gap
# between the two offs is what this instrument cannot resolve.
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


def measure(rounds: int = 30, batch: int = 500) -> dict[str, Any]:
    """Run in a fresh interpreter: the telemetry modules read their environment once."""
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.components", "--child", str(rounds), str(batch)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if child.returncode:
        raise RuntimeError(f"components benchmark failed:\n{child.stderr[-3000:]}")
    return dict(json.loads(child.stdout.strip().splitlines()[-1]))


def _child(rounds: int, batch: int) -> dict[str, Any]:
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", _SINK.format(port=port)])
    tmp = Path(tempfile.mkdtemp())
    os.environ.update(
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"),
        OTEL_SDK_DISABLED="false",
        OTEL_TRACES_SAMPLER="always_on",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
    )
    (tmp / "metrics").mkdir()
    from api.telemetry.relay import SOCKET_ENV, Relay

    relay = Relay()
    os.environ[SOCKET_ENV] = relay.path
    redis_server = RedisServer(tmp / "redis")
    redis_server.start()
    try:
        return uvloop.run(_drive(tmp, redis_server.url, rounds, batch, relay.process.pid))
    finally:
        redis_server.stop()
        relay.stop()
        sink.kill()
        shutil.rmtree(tmp, ignore_errors=True)


async def _drive(
    tmp: Path, redis_url: str, rounds: int, batch: int, relay_pid: int
) -> dict[str, Any]:
    from opentelemetry.trace import NoOpTracer

    from api import telemetry
    from api.config import Settings
    from api.main import create_app
    from api.middleware import RequestTelemetry
    from api.telemetry import flusher, traces

    settings = Settings(
        data_dir=tmp / "data",
        model_dir=ROOT / "models",
        documents_dir=ROOT / "documents",
        redis_url=redis_url,
        generator="extractive",
        log_format="json",
    )
    app = create_app(settings)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115  # the access lines go nowhere
    body = json.dumps(QUESTION).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/query",
        "raw_path": b"/query",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def request() -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"status {message['status']}")

        await app(dict(scope), receive, send)

    started: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
    startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, startup.get, started.put)
    )
    assert (await started.get())["type"] == "lifespan.startup.complete"
    middleware: Any = app.middleware_stack  # built by the lifespan's call
    while not isinstance(middleware, RequestTelemetry):
        middleware = middleware.app
    real_tracer = traces._tracer

    def configure(flags: str) -> None:
        middleware.recorder.access_log_on = "l" in flags
        middleware.recorder.tracing_on = "t" in flags
        telemetry.enable_metrics("m" in flags)
        traces._tracer = real_tracer if "t" in flags else NoOpTracer()

    async def clients(count: int) -> None:  # four concurrent clients, as wrk -c4
        async def client(n: int) -> None:
            for _ in range(n):
                await request()

        await asyncio.gather(*(client(count // 4) for _ in range(4)))

    await clients(400)  # the cache is filled, the code warm
    provider = traces._provider
    assert provider is not None

    def settle() -> None:
        """What a batch deferred is charged to it, not to the next: queued log lines and
        metric increments written (and exemplars, which a worker writes only once a
        second: a metrics batch pays for one write more than it would), queued spans sent
        to the relay, its garbage collected."""
        flusher.flush()
        provider.force_flush()
        gc.collect()

    cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    relayed: dict[str, list[float]] = {name: [] for name in SETTINGS}
    order = random.Random(4)  # a fixed seed: reruns shuffle alike
    for _ in range(rounds):
        # A new order every round: a setting that follows a heavier one would otherwise
        # always inherit its leftovers (a fixed rotation once put ~10 µs on "off").
        for name in order.sample(list(SETTINGS), len(SETTINGS)):
            configure(SETTINGS[name])
            await clients(40)
            settle()  # no batch starts with another's leftovers
            await asyncio.sleep(0.3)  # the relay done with the previous setting's spans
            before, relay_before = time.process_time(), cpu_seconds(relay_pid)
            await clients(batch)
            settle()
            cpu[name].append((time.process_time() - before) / batch * 1e6)
            await asyncio.sleep(0.3)  # the relay done with this one's
            relayed[name].append(cpu_seconds(relay_pid) - relay_before)
    configure(SETTINGS["everything"])
    await startup.put({"type": "lifespan.shutdown"})
    await lifespan
    median = {name: statistics.median(values) for name, values in cpu.items()}
    # The kernel counts CPU in 10 ms ticks, coarse for one batch: the relay's is the total
    # over all of a setting's batches.
    relay = {name: sum(values) / (batch * rounds) * 1e6 for name, values in relayed.items()}
    return {
        "us_per_request": median,
        "relay_us_per_request": relay,
        "rounds": rounds,
        "batch": batch,
    }


def report(result: dict[str, Any]) -> None:
    median, relay = result["us_per_request"], result["relay_us_per_request"]
    off = median["off"]
    print(
        f"\ntelemetry's CPU per cached /query, in-process on uvloop, 4 clients, median of "
        f"{result['rounds']} alternating batches of {result['batch']}:"
    )
    print(f"  {'':12s} {'the app':>9s} {'over off':>10s} {'span relay':>11s}")
    for name, value in median.items():
        print(f"  {name:12s} {value:6.1f} µs {value - off:+7.1f} µs {relay[name]:8.1f} µs")
    print("  (the gap between the two offs is this instrument's resolution)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        report(measure())

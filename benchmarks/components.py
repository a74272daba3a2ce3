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
import random
import statistics
import subprocess
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import uvloop

from benchmarks import inprocess
from benchmarks.inprocess import SETTINGS
from benchmarks.overhead import QUESTION, cpu_seconds


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
    with inprocess.surroundings() as (tmp, redis_url, relay_pid):
        return uvloop.run(_drive(tmp, redis_url, rounds, batch, relay_pid))


async def _drive(
    tmp: Path, redis_url: str, rounds: int, batch: int, relay_pid: int
) -> dict[str, Any]:
    app = inprocess.app(tmp / "data", redis_url)
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
    configure = inprocess.switches(app)

    async def clients(count: int) -> None:  # four concurrent clients, as wrk -c4
        async def client(n: int) -> None:
            for _ in range(n):
                await request()

        await asyncio.gather(*(client(count // 4) for _ in range(4)))

    await clients(400)  # the cache is filled, the code warm
    cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    relayed: dict[str, list[float]] = {name: [] for name in SETTINGS}
    order = random.Random(4)  # a fixed seed: reruns shuffle alike
    for _ in range(rounds):
        # A new order every round: a setting that follows a heavier one would otherwise
        # always inherit its leftovers (a fixed rotation once put ~10 µs on "off").
        for name in order.sample(list(SETTINGS), len(SETTINGS)):
            configure(SETTINGS[name])
            await clients(40)
            inprocess.settle()  # no batch starts with another's leftovers
            gc.collect()
            await asyncio.sleep(0.3)  # the relay done with the previous setting's spans
            before, relay_before = time.process_time(), cpu_seconds(relay_pid)
            await clients(batch)
            inprocess.settle()
            gc.collect()  # its garbage too
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

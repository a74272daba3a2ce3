"""`make bench`, part: what observability costs a cached `/query`, counted by callgrind.

On this shared VM two identical servers measure up to ~5% apart by the clock, about half
the overhead target. Callgrind (valgrind) counts the instructions the CPU executes, the
same figure on every run to within half a percent, and simulates the caches and branch
predictor (their misses move more between runs, by up to ~15% of a setting's figure, with
where the allocator puts things). So this runs the service's app under callgrind as a
worker runs it: behind uvicorn's HTTP server, with the worker's own protocol
(api/worker.py), on uvloop, the span relay and Redis in processes of their own
(benchmarks/inprocess.py). A client outside valgrind sends the requests, four at a time
over keep-alive connections. Each setting is switched on in the same running app and
counted over the same requests, including the flush of what they queued (log lines,
metric increments, spans to the relay).

How to read it (docs/BENCHMARKS.md, session 13):
- instructions are not equal in time. A miss in the L2 costs tens of cycles and a
  mispredicted branch ~15, where an instruction costs a fraction of one, and the
  telemetry adds misses in a larger proportion than instructions, which is part of why
  the clock (benchmarks/overhead.py) finds it dearer than its count;
- the kernel's work (the sockets, the same in every setting) is not counted, so the
  percentages are of the process's own work;
- valgrind runs the app ~50x slower, so what a worker does by the clock (the flusher's
  0.1 s tick, the span processor's 5 s timer) would come far more often per request
  here. Both are held off: the queues still write when full, as in a busy worker, and
  the rest is written at the end of each window of 400.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

import uvloop

from benchmarks import inprocess
from benchmarks.inprocess import SETTINGS
from benchmarks.overhead import QUESTION
from tests.servers import ROOT, free_port

# The client requests callgrind answers (valgrind/callgrind.h). Starting instrumentation
# empties the simulated caches, so a window is instrumented first, warmed, and only then
# counted from zero; its stop writes it to a file of its own, by name.
_MARKS = r"""
#include <valgrind/callgrind.h>
void mark_instrument(void) { CALLGRIND_START_INSTRUMENTATION; }
void mark_zero(void) { CALLGRIND_ZERO_STATS; }
void mark_stop(const char *name) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT(name); }
"""
WARM_UP = 400  # requests before anything is counted: Redis's answer cached, every path taken
WARM_CACHES = 40  # instrumented requests before each window: the simulated caches filled
# The control last: anything one setting leaves to the next would show in it.
ORDER = ("off", "access log", "metrics", "traces", "everything", "off, again")
# Simulated caches shaped like this machine's cores (`lscpu`: an AMD EPYC of family 25,
# model 17, Zen 4, with 32 KiB 8-way L1s and a 1 MiB 8-way L2 per core, the L2 simulated
# as callgrind's last level; the 32 MiB L3 is shared with the host's other guests, and
# simulated as a last level it caught all but ~20 misses a request in every setting).
_CACHES = ["--I1=32768,8,64", "--D1=32768,8,64", "--LL=1048576,8,64"]
# Callgrind's events, summed into what the report shows.
KINDS = {
    "instructions": ("Ir",),
    "L1 misses": ("I1mr", "D1mr", "D1mw"),
    "L2 misses": ("ILmr", "DLmr", "DLmw"),
    "mispredicted branches": ("Bcm", "Bim"),
}


def measure(requests: int = 400, keep: Path | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Per request, for every setting, counted over `requests` each: instructions, and
    the misses of simulated caches and branch predictors (`KINDS`). `keep`: a directory
    to copy callgrind's files to, one per setting, for `callgrind_annotate`; `timeout`:
    seconds for the whole count."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed: run `make system-deps`")
    if shutil.which("cc") is None:
        raise RuntimeError("no C compiler: `make install` installs build-essential")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # The sample corpus embedded natively first: at start-up under valgrind it took
        # ten minutes.
        subprocess.run(
            [sys.executable, "-m", "benchmarks.instructions", "--prepare", str(tmp / "data")],
            check=True,
            timeout=600,
            cwd=ROOT,
        )
        (tmp / "marks.c").write_text(_MARKS)
        subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", tmp / "marks.so", tmp / "marks.c"],
            check=True,
        )
        child = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                "--cache-sim=yes",
                "--branch-sim=yes",
                *_CACHES,
                f"--callgrind-out-file={tmp / 'count'}",
                sys.executable,
                "-m",
                "benchmarks.instructions",
                "--child",
                str(requests),
                str(tmp / "marks.so"),
                str(tmp / "data"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            _, errors = child.communicate(timeout=timeout)
        except BaseException:
            # SIGTERM lets the child stop the relay, Redis and the sink it started.
            child.terminate()
            try:
                child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
            raise
        if child.returncode:
            raise RuntimeError(f"instruction count failed:\n{errors[-3000:]}")
        counted = {}
        for dump in tmp.glob("count.*"):
            text = dump.read_text(errors="replace")
            name = re.search(r"^desc: Trigger: Client Request: (.+)$", text, re.M)
            events = re.search(r"^events: (.+)$", text, re.M)
            totals = re.search(r"^totals: (.+)$", text, re.M)
            if name and events and totals:
                # A cost line may leave out its trailing zeros.
                found = dict(
                    zip(events.group(1).split(), map(int, totals.group(1).split()), strict=False)
                )
                counted[name.group(1)] = {
                    kind: sum(found.get(event, 0) for event in events_of) / requests
                    for kind, events_of in KINDS.items()
                }
            if name and keep:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(dump, keep / ("callgrind." + re.sub(r"\W+", "-", name.group(1))))
    missing = set(SETTINGS) - set(counted)
    if missing:
        raise RuntimeError(f"no count for {sorted(missing)}")
    return {"per_request": {name: counted[name] for name in SETTINGS}, "requests": requests}


def _child(requests: int, marks: str | None, data: Path) -> None:
    """Counted, under valgrind, with the `marks` library; without it, the app started on
    `data` and stopped, as `measure`'s native first step."""
    from ctypes import CDLL

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # and cleans up
    if marks:
        # A busy worker fills a batch of spans (512) long before the 5 s timer fires;
        # under valgrind, ~50x slower, the timer would cut batches of a few hundred.
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = str(3600 * 1000)
    try:
        with inprocess.surroundings() as (_, redis_url, _):
            uvloop.run(_drive(data, redis_url, requests, marks and CDLL(marks)))
    except BaseException:
        traceback.print_exc(file=sys.__stderr__)  # the app points sys.stderr at /dev/null
        raise


async def _drive(data: Path, redis_url: str, requests: int, marks: Any) -> None:
    import uvicorn

    from api.worker import WholeResponseProtocol

    app = inprocess.app(data, redis_url)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=free_port(),
            loop="none",  # this one, uvloop's, as the worker's
            http=WholeResponseProtocol,
            lifespan="on",
            access_log=False,
            log_config=None,
            timeout_keep_alive=3600,  # the client's connections outlive valgrind's pauses
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():  # the app did not start: uvicorn has said why
            raise RuntimeError("the app did not start")
        await asyncio.sleep(0.1)
    if marks:  # without them, the native first step: the corpus is in the store now
        await _count(app, server.config.port, requests, marks)
    server.should_exit = True
    await serving


async def _count(app: Any, port: int, requests: int, marks: Any) -> None:
    """Each setting's window, counted, with the requests sent by a client of its own."""
    # Not under valgrind: a new program is not followed (callgrind's --trace-children=no).
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--client",
        str(port),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    stdin, stdout = client.stdin, client.stdout

    async def send(count: int) -> None:
        stdin.write(b"%d\n" % count)
        await stdin.drain()
        answer = await stdout.readline()
        if answer != b"done\n":
            raise RuntimeError(f"the client says {answer!r}")

    from api.telemetry import flusher

    # A worker answering ~3,000 requests/s writes its queued lines and increments every
    # ~300 (a tick of 0.1 s); under valgrind a tick would come every few requests. Here
    # the tick is held off: the log queue still writes when 256 lines wait and the span
    # queue sends at 512 spans, as in a worker, and the rest is written at each window's
    # end (`settle`).
    flusher.TICK = 3600.0
    configure = inprocess.switches(app)
    try:
        for flags in ("lmt", ""):
            configure(flags)
            await send(WARM_UP // 2)
        for name in ORDER:
            configure(SETTINGS[name])
            await send(80)
            marks.mark_instrument()
            await send(WARM_CACHES)
            inprocess.settle()
            gc.collect()
            marks.mark_zero()
            await send(requests)
            inprocess.settle()
            marks.mark_stop(name.encode())
    finally:
        stdin.close()
        await client.wait()


def _client(port: int) -> None:
    """For each count read from stdin, that many cached queries over four keep-alive
    connections; then "done" on stdout."""
    body = json.dumps(QUESTION)
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(4)]
    failures: list[str] = []

    def run(connection: http.client.HTTPConnection, count: int) -> None:
        try:
            for _ in range(count):
                connection.request("POST", "/query", body, {"content-type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(str(response.status))
        except Exception as exc:  # a window that served fewer requests must not count
            failures.append(repr(exc))

    for line in sys.stdin:
        count = int(line)
        threads = [
            threading.Thread(target=run, args=(c, count // 4 + (i < count % 4)))
            for i, c in enumerate(connections)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("done" if not failures else f"failed: {failures[:3]}", flush=True)


def report(result: dict[str, Any]) -> None:
    counted = result["per_request"]
    print(
        f"\nper cached /query through uvicorn, counted by callgrind ({result['requests']} "
        "requests a setting, 4 clients), and over off:"
    )
    print(f"  {'':12s}" + "".join(f"{kind:>19s}      " for kind in KINDS))
    off = counted["off"]
    for name, values in counted.items():
        cells = "".join(
            f"{values[kind]:12.0f} {values[kind] / off[kind] - 1:+6.1%}      " for kind in KINDS
        )
        print(f"  {name:12s}{cells}")
    print("  (off is counted first and again last: the gap between the two is the resolution)")
    on, logs = counted["everything"]["instructions"], counted["access log"]["instructions"]
    print(
        "  by instructions alone, everything on serves "
        f"{1 - off['instructions'] / on:.1%} fewer requests/s than off, "
        f"{1 - logs / on:.1%} fewer than the access log alone (issue 4's off)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1:2] == ["--prepare"]:
        _child(0, None, Path(sys.argv[2]))
    elif sys.argv[1:2] == ["--client"]:
        _client(int(sys.argv[2]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("requests", nargs="?", type=int, default=400)
        parser.add_argument("--keep", type=Path, help="where to copy callgrind's files")
        arguments = parser.parse_args()
        report(measure(arguments.requests, arguments.keep))

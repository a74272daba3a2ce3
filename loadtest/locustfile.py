"""Locust scenarios for the RAG API. Run through `make loadtest` (python -m loadtest run),
which picks the user classes for a scenario and turns the raw figures into a report.

Scenarios (user classes; `mixed` runs them all by weight):
- CacheHitUser     a few popular questions, answered from the cache once warm
- CacheMissUser    unique questions from the corpus's question bank: retrieval + LLM
- StreamingUser    unique questions, streamed: time to first token and to the last byte
                   are separate entries
- IngestUser       small unique documents through POST /documents

Closed model (the default): each user sends its next request when the last returns.
Open model (LOADTEST_ARRIVAL_RATE requests/s): OpenModelUser sends on a fixed schedule
whatever the answers' speed, times each request from when it *should* have been sent
(so a server that stalls is charged for the queue it causes: no coordinated omission),
and counts sends that went out late or were dropped for being too late.

Load shapes (LOADTEST_SHAPE): step, spike, soak, breakpoint (ramp until the SLO breaks).

Each request carries an X-Request-ID `lt-<run>-<kind>-<pid>-<n>`, so the run's requests
can be found in nginx's and the API's logs.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
from locust import FastHttpUser, LoadTestShape, constant_pacing, events, task
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment
from locust.runners import WORKER_REPORT_INTERVAL, LocalRunner, MasterRunner, WorkerRunner

from loadtest import live
from loadtest.hdr import DERIVED, Aggregate, Recorder
from loadtest.questions import POPULAR, unique_questions
from loadtest.scenarios import SCENARIOS

RUN_ID = os.environ.get("LOADTEST_RUN_ID", uuid.uuid4().hex[:8])
RAW_PATH = os.environ.get("LOADTEST_RAW")
SCENARIO = os.environ.get("LOADTEST_SCENARIO", "mixed")
ARRIVAL_RATE = float(os.environ.get("LOADTEST_ARRIVAL_RATE", "0"))  # per process
MAX_LATE_S = float(os.environ.get("LOADTEST_MAX_LATE", "1.0"))
LATE_S = 0.010  # a send this much behind its schedule is late
SHAPE = os.environ.get("LOADTEST_SHAPE", "")
SAMPLES_DIR = os.environ.get("LOADTEST_SAMPLES", "")  # every request's row (--samples)
# Every upload changes the corpus and so retires every cached answer: in the mixed
# scenario uploads are paced, as they are in real use (closed model: per upload user;
# open model: per process); alone, they run flat out.
INGEST_EVERY_S = float(os.environ.get("LOADTEST_INGEST_EVERY", "0"))

_recorder = Recorder()
_aggregate = Aggregate()
_run: dict[str, float] = {}  # start, stop, metrics port: facts for raw.json
_announced: list[Path | None] = []
_ids = itertools.count()
_banks: dict[int, Iterator[str]] = {}


def _next_question() -> str:
    """A question no other process asks: Locust imports this file before it forks its
    worker processes, so the bank is made per process, on first use."""
    pid = os.getpid()
    if pid not in _banks:
        _banks[pid] = unique_questions(f"{RUN_ID}-{pid}")
    return next(_banks[pid])


def _request_id(kind: str) -> dict[str, str]:
    return {"X-Request-ID": f"lt-{RUN_ID}-{kind}-{os.getpid()}-{next(_ids)}"}


# --- the requests, shared by the closed-model users and the open-model one.
# `started` is when timing begins: now for a closed model, the scheduled send time for an
# open one. Each returns nothing; Locust's request event carries the result.
def ask_popular(client: FastHttpSession, started: float) -> None:
    _timed_post(
        client,
        started,
        name="POST /query [hit]",
        path="/query",
        body={"question": random.choice(POPULAR)},
        headers=_request_id("hit"),
    )


def ask_new(client: FastHttpSession, started: float) -> None:
    _timed_post(
        client,
        started,
        name="POST /query [miss]",
        path="/query",
        body={"question": _next_question()},
        headers=_request_id("miss"),
    )


def ingest(client: FastHttpSession, started: float) -> None:
    marker = f"{RUN_ID}-{os.getpid()}-{next(_ids)}"
    text = (
        f"Load test note {marker}. The on-call engineer recorded that the cache warmed "
        "within a minute after the deploy, and that latency returned to its baseline."
    )
    body = {"documents": [{"text": text, "source": f"loadtest-{marker}.txt"}]}
    _timed_post(
        client,
        started,
        name="POST /documents",
        path="/documents",
        body=body,
        headers=_request_id("ingest"),
    )


def ask_streaming(client: FastHttpSession, started: float) -> None:
    first_token: float | None = None
    body = b""
    headers = _request_id("stream")
    with client.post(
        "/query",
        json={"question": _next_question(), "stream": True},
        name="POST /query [stream] complete",
        headers=headers,
        stream=True,
        catch_response=True,
        context={"request_id": headers["X-Request-ID"]},
    ) as response:
        broken = False
        try:
            if response.status_code == 200:
                while chunk := response.stream.read(4096):
                    body += chunk
                    if first_token is None and b"event: token" in body:
                        first_token = time.perf_counter()
        except Exception as exc:  # reset, timeout, a killed worker: a failed request
            broken = True
            response.failure(f"stream broke: {exc!r}")
        # Locust's own figure stops at the headers when streaming: the entry is the whole
        # answer, to its last byte.
        response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
        response.request_meta["response_length"] = len(body)
        if response.status_code == 200 and not broken and b"event: done" not in body:
            response.failure("stream ended without a done event")
    if first_token is not None:
        events.request.fire(
            request_type=DERIVED,
            name="POST /query [stream] first token",
            response_time=(first_token - started) * 1000,
            response_length=0,
            exception=None,
            context={},
        )


def _timed_post(
    client: FastHttpSession,
    started: float,
    *,
    name: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    with client.post(
        path,
        json=body,
        name=name,
        headers=headers,
        catch_response=True,
        context={"request_id": headers["X-Request-ID"]},
    ) as r:
        r.request_meta["response_time"] = (time.perf_counter() - started) * 1000


Request = Callable[[FastHttpSession, float], None]
KINDS: dict[str, tuple[Request, int]] = {
    # user class name: (request, weight in the mixed scenario)
    "CacheHitUser": (ask_popular, 6),
    "CacheMissUser": (ask_new, 2),
    "StreamingUser": (ask_streaming, 1),
    "IngestUser": (ingest, 1),
}


class _KindUser(FastHttpUser):
    """Sends one kind of request from KINDS, the one its class is named for."""

    abstract = True

    @task
    def send(self) -> None:
        KINDS[type(self).__name__][0](self.client, time.perf_counter())


class CacheHitUser(_KindUser):
    weight = KINDS["CacheHitUser"][1]


class CacheMissUser(_KindUser):
    weight = KINDS["CacheMissUser"][1]


class StreamingUser(_KindUser):
    weight = KINDS["StreamingUser"][1]


class IngestUser(_KindUser):
    weight = KINDS["IngestUser"][1]
    wait_time = constant_pacing(INGEST_EVERY_S)


# --- the open model
class _Schedule:
    """Send slots at a fixed rate for this process, shared by all its users."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start: float | None = None
        self.slots = itertools.count()
        self.late = self.dropped = self.sent = 0
        self.max_late_s = 0.0

    def next_slot(self) -> float:
        if self.start is None:
            self.start = time.perf_counter()
        return self.start + next(self.slots) / self.rate


_schedule = _Schedule(ARRIVAL_RATE) if ARRIVAL_RATE > 0 else None
# The open model's mix, drawn from on every send: built once. Uploads, when paced, are
# drawn only once INGEST_EVERY_S has passed since this process's last one.
_mix_requests = [KINDS[name][0] for name in SCENARIOS.get(SCENARIO, [])]
_mix_weights = [KINDS[name][1] for name in SCENARIOS.get(SCENARIO, [])]
_query_requests = [r for r in _mix_requests if r is not ingest]
_query_weights = [w for r, w in zip(_mix_requests, _mix_weights, strict=True) if r is not ingest]
_last_upload = [-float("inf")]


def _draw() -> Request:
    request = random.choices(_mix_requests, weights=_mix_weights)[0]
    if request is ingest and INGEST_EVERY_S > 0 and _query_requests:
        now = time.perf_counter()
        if now - _last_upload[0] < INGEST_EVERY_S:
            return random.choices(_query_requests, weights=_query_weights)[0]
        _last_upload[0] = now
    return request


class OpenModelUser(FastHttpUser):
    """One of a pool of senders (the users) serving the schedule: a slot is taken by the
    first free sender. If none is free in time, the send is late, and its latency counts
    from the slot, as the waiting client's would."""

    @task
    def send(self) -> None:
        assert _schedule is not None
        slot = _schedule.next_slot()
        wait = slot - time.perf_counter()
        if wait > 0:
            gevent.sleep(wait)
        behind = time.perf_counter() - slot
        _schedule.max_late_s = max(_schedule.max_late_s, behind)
        if behind > MAX_LATE_S:
            # Every sender was still waiting on the server (or the generator is out of
            # CPU): not sent at all, and counted against the run's error rate.
            _schedule.dropped += 1
            return
        _schedule.late += behind > LATE_S
        _schedule.sent += 1
        _draw()(self.client, slot)


# --- load shapes
def _shape_class() -> type[LoadTestShape] | None:
    if not SHAPE:
        return None
    users = int(os.environ["LOADTEST_USERS"])
    seconds = float(os.environ["LOADTEST_SECONDS"])
    rate = float(os.environ.get("LOADTEST_SPAWN_RATE", users))
    slo = json.loads(os.environ.get("LOADTEST_BREAKPOINT_SLO", "{}"))

    class Shape(LoadTestShape):
        def tick(self) -> tuple[int, float] | None:
            t = self.get_run_time()
            if t >= seconds or _aggregate.breakpoint:
                return None
            if SHAPE == "step":  # five equal steps up to the peak
                return max(1, users * (int(t / (seconds / 5)) + 1) // 5), rate
            if SHAPE == "spike":  # a fifth of the peak, the peak in the middle fifth
                low = max(1, users // 5)
                return (users if 0.4 * seconds <= t < 0.6 * seconds else low), rate * 10
            if SHAPE == "breakpoint":  # a straight ramp until the SLO breaks
                _aggregate.check_breakpoint(slo, self.runner.user_count if self.runner else 0)
                return max(1, round(users * t / seconds)), rate
            return users, rate  # soak: the peak, held

    return Shape


if (_shape := _shape_class()) is not None:
    globals()["Shape"] = _shape  # Locust picks up the one LoadTestShape in this module


# --- HDR recording, merged across worker processes
@events.request.add_listener
def _on_request(
    request_type: str,
    name: str,
    response_time: float,
    exception: Any = None,
    context: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    failed = exception is not None
    _recorder.record(name, request_type, response_time, failed=failed)
    if SAMPLES_DIR and request_type != DERIVED:
        _samples.add((context or {}).get("request_id", ""), name, response_time, failed)


class _Samples:
    """--samples: one row per request, in a file per process: its id (as nginx and the
    API log it), entry, time as the report counts it, and outcome. Opened on the first
    request (Locust forks its workers after importing this file); a request that ends
    after the close (there should be none) writes nothing."""

    def __init__(self) -> None:
        self._out: Any = None
        self._writer: Any = None
        self._closed = False

    def add(self, request_id: str, name: str, ms: float, failed: bool) -> None:
        if self._closed:
            return
        if self._writer is None:
            path = Path(SAMPLES_DIR) / f"samples-{os.getpid()}.csv"
            self._out = path.open("w", newline="")
            self._writer = csv.writer(self._out)
            self._writer.writerow(["request_id", "entry", "ms", "failed"])
        self._writer.writerow([request_id, name, f"{ms:.3f}", int(failed)])

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        self._closed = True


_samples = _Samples()


def _generator_stats() -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats: dict[str, Any] = {"cpu_seconds": usage.ru_utime + usage.ru_stime, "at": time.time()}
    if _schedule is not None:
        stats.update(
            sent=_schedule.sent,
            late=_schedule.late,
            dropped=_schedule.dropped,
            max_late_s=_schedule.max_late_s,
        )
    return stats


def _payload() -> dict[str, Any]:
    """This process's figures since the last call, for the aggregate."""
    return {**_recorder.take(), "generator": _generator_stats()}


@events.report_to_master.add_listener
def _to_master(client_id: str, data: dict[str, Any]) -> None:
    data["hdr"] = _payload()


@events.worker_report.add_listener
def _from_worker(client_id: str, data: dict[str, Any]) -> None:
    if "hdr" in data:
        _aggregate.add(data["hdr"], source=client_id)
    if "stop" in _run and data.get("users_running") == 0:
        _finished_workers.add(client_id)


_finished_workers: set[str] = set()


def _quit_after_final_reports(runner: MasterRunner) -> None:
    """Locust's master quits 0.5 s after telling its workers to, but a worker first lets
    its users finish their requests (up to --stop-timeout) and only then sends its last
    figures, so a run's slowest requests, those still running at its end, were lost
    (locustio/locust#1426). This master stops the users first, waits for a report from
    each worker sent after its last user ended (they report every 3 s), then quits."""
    quit_now = runner.quit
    # Locust calls quit up to four times at the end of a run (the timer or the shape,
    # the quitting event, shutdown), and a SIGTERM can add one while the first waits:
    # the first call waits for the reports, the others wait for it.
    reported = gevent.event.Event()
    waiting: list[bool] = []

    def quit() -> None:
        if waiting:
            reported.wait()
        else:
            waiting.append(True)
            try:
                _stop_and_wait_for_reports(runner)
            finally:
                reported.set()
        quit_now()

    runner.quit = quit  # type: ignore[method-assign]


def _stop_and_wait_for_reports(runner: MasterRunner) -> None:
    workers = set(runner.clients.keys())
    runner.stop()  # returns once no worker has users left (up to --stop-timeout + 60 s)
    if "start" not in _run:  # quit before the run began: nothing was sent
        return
    deadline = time.monotonic() + 3 * WORKER_REPORT_INTERVAL
    while not workers <= _finished_workers and time.monotonic() < deadline:
        gevent.sleep(0.1)
    if missing := workers - _finished_workers:
        print(
            f"loadtest: no final report from {len(missing)} worker process(es): "
            "the requests they ran last are not counted",
            file=sys.stderr,
        )


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        _quit_after_final_reports(runner)
    if isinstance(runner, WorkerRunner):
        # The master quits once each worker has reported with no user left (see above).
        @environment.events.report_to_master.add_listener
        def _users(client_id: str, data: dict[str, Any]) -> None:
            data["users_running"] = runner.user_count

    if not isinstance(environment.runner, WorkerRunner):
        collector = live.LiveCollector(
            lambda: [
                (e.name, e.num_requests, e.num_failures) for e in environment.stats.entries.values()
            ],
            lambda: environment.runner.user_count if environment.runner else 0,
            _aggregate,
            RUN_ID,
        )
        port = live.serve(collector, int(os.environ.get("LOADTEST_METRICS_PORT", "0")))
        _run["metrics_port"] = port
        targets = os.environ.get("LOADTEST_TARGETS_DIR")
        _announced.append(live.announce(Path(targets) if targets else None, port))
    if isinstance(environment.runner, LocalRunner):
        # No master to report to: move figures into the aggregate on the same rhythm.
        def rotate() -> None:
            while True:
                gevent.sleep(3)
                _aggregate.add(_payload())

        gevent.spawn(rotate)


@events.test_start.add_listener
def _on_start(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        _run["start"] = time.time()


@events.test_stopping.add_listener
def _on_stopping(environment: Environment, **_: Any) -> None:
    """The end of the run's window: no request starts after it. Users then finish what
    they were doing (up to --stop-timeout), which is not time spent asking, so rates are
    per second of this window."""
    if not isinstance(environment.runner, WorkerRunner):
        _run.setdefault("stop", time.time())


@events.quitting.add_listener
def _on_quit(environment: Environment, **_: Any) -> None:
    """The master (or the lone local process) writes the run's raw figures. A process
    with users stops them first: on SIGTERM (Ctrl-C in the harness) Locust fires this
    before it stops them, and the requests still running would end after the figures
    were written."""
    if isinstance(environment.runner, LocalRunner | WorkerRunner):
        environment.runner.stop()  # at once if they already stopped
    _samples.close()
    if isinstance(environment.runner, WorkerRunner):
        return
    for path in _announced:
        live.withdraw(path)
    if RAW_PATH is None:
        return
    if isinstance(environment.runner, LocalRunner):
        _aggregate.add(_payload())
    counts = {
        entry.name: {
            "method": entry.method,
            "requests": entry.num_requests,
            "failures": entry.num_failures,
        }
        for entry in environment.stats.entries.values()
    }
    _aggregate.dump(
        Path(RAW_PATH),
        {
            "run_id": RUN_ID,
            "started": _run.get("start"),
            "stopped": _run.get("stop", time.time()),
            "counts": counts,
            # A worker's every report carries its generator figures, keyed by its id.
            "workers": len(_aggregate.generators)
            if isinstance(environment.runner, MasterRunner)
            else 1,
            "metrics_port": _run.get("metrics_port"),
        },
    )

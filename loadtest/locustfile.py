"""Locust scenarios for the RAG API. Run through `make loadtest` (python -m loadtest run),
which picks the user classes for a scenario and turns the raw figures into a report.

Scenarios (user classes; `mixed` runs them all by weight):
- CacheHitUser     a few popular questions, answered from the cache once warm
- CacheMissUser    unique questions from the corpus's question bank: retrieval + LLM
- StreamingUser    unique questions, streamed: time to first token and to the last byte
                   are separate entries
- IngestUser       small unique documents through POST /documents

Each request carries an X-Request-ID `lt-<run>-<kind>-<pid>-<n>`, so the run's requests
can be found in nginx's and the API's logs.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, constant_pacing, events, task
from locust.env import Environment
from locust.runners import LocalRunner, MasterRunner, WorkerRunner

from loadtest.hdr import DERIVED, Aggregate, Recorder
from loadtest.questions import POPULAR, unique_questions

RUN_ID = os.environ.get("LOADTEST_RUN_ID", uuid.uuid4().hex[:8])
RAW_PATH = os.environ.get("LOADTEST_RAW")

_recorder = Recorder()
_aggregate = Aggregate()
_times: dict[str, float] = {}
_workers: set[str] = set()
_ids = itertools.count()
_bank = unique_questions(f"{RUN_ID}-{os.getpid()}")


def _request_id(kind: str) -> dict[str, str]:
    return {"X-Request-ID": f"lt-{RUN_ID}-{kind}-{os.getpid()}-{next(_ids)}"}


class CacheHitUser(FastHttpUser):
    weight = 6

    @task
    def ask_popular(self) -> None:
        self.client.post(
            "/query",
            json={"question": random.choice(POPULAR)},
            name="POST /query [hit]",
            headers=_request_id("hit"),
        )


class CacheMissUser(FastHttpUser):
    weight = 2

    @task
    def ask_new(self) -> None:
        self.client.post(
            "/query",
            json={"question": next(_bank)},
            name="POST /query [miss]",
            headers=_request_id("miss"),
        )


class StreamingUser(FastHttpUser):
    weight = 1

    @task
    def ask_streaming(self) -> None:
        start = time.perf_counter()
        first_token: float | None = None
        body = b""
        with self.client.post(
            "/query",
            json={"question": next(_bank), "stream": True},
            name="POST /query [stream] complete",
            headers=_request_id("stream"),
            stream=True,
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                while chunk := response.stream.read(4096):
                    body += chunk
                    if first_token is None and b"event: token" in body:
                        first_token = time.perf_counter()
            # Locust's own figure stops at the headers when streaming: the entry is the
            # whole answer, to its last byte.
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            response.request_meta["response_length"] = len(body)
            if response.status_code == 200 and b"event: done" not in body:
                response.failure("stream ended without a done event")
        if first_token is not None:
            events.request.fire(
                request_type=DERIVED,
                name="POST /query [stream] first token",
                response_time=(first_token - start) * 1000,
                response_length=0,
                exception=None,
                context={},
            )


class IngestUser(FastHttpUser):
    weight = 1
    # Every upload changes the corpus and so retires every cached answer: in the mixed
    # scenario uploads are paced (LOADTEST_INGEST_EVERY seconds per user), as they are in
    # real use; alone, they run flat out.
    wait_time = constant_pacing(float(os.environ.get("LOADTEST_INGEST_EVERY", "0")))

    @task
    def ingest(self) -> None:
        marker = f"{RUN_ID}-{os.getpid()}-{next(_ids)}"
        text = (
            f"Load test note {marker}. The on-call engineer recorded that the cache warmed "
            "within a minute after the deploy, and that latency returned to its baseline."
        )
        self.client.post(
            "/documents",
            json={"documents": [{"text": text, "source": f"loadtest-{marker}.txt"}]},
            name="POST /documents",
            headers=_request_id("ingest"),
        )


# --- HDR recording, merged across worker processes
@events.request.add_listener
def _on_request(request_type: str, name: str, response_time: float, **_: Any) -> None:
    _recorder.record(name, request_type, response_time)


@events.report_to_master.add_listener
def _to_master(client_id: str, data: dict[str, Any]) -> None:
    data["hdr"] = _recorder.take()


@events.worker_report.add_listener
def _from_worker(client_id: str, data: dict[str, Any]) -> None:
    if "hdr" in data:
        _workers.add(client_id)
        _aggregate.add(data["hdr"])


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, LocalRunner):
        # No master to report to: move figures into the aggregate on the same rhythm.
        def rotate() -> None:
            while True:
                gevent.sleep(3)
                _aggregate.add(_recorder.take())

        gevent.spawn(rotate)


@events.test_start.add_listener
def _on_start(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        _times["start"] = time.time()


@events.test_stop.add_listener
def _on_stop(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        _times["stop"] = time.time()


@events.quitting.add_listener
def _on_quit(environment: Environment, **_: Any) -> None:
    """The master (or the lone local process) writes the run's raw figures."""
    if isinstance(environment.runner, WorkerRunner) or RAW_PATH is None:
        return
    if isinstance(environment.runner, LocalRunner):
        _aggregate.add(_recorder.take())
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
            "started": _times.get("start"),
            "stopped": _times.get("stop", time.time()),
            "counts": counts,
            "workers": len(_workers) if isinstance(environment.runner, MasterRunner) else 1,
        },
    )

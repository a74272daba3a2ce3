"""Prometheus metrics that stay correct with several gunicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (as `serve` does), every worker writes its samples to
mmap files there and whichever worker answers a scrape reads them all. Two things
multiprocess mode lacks are provided here:

- Per-worker RSS and CPU: there is no process collector in multiprocess mode, so each
  worker publishes its own into `liveall` gauges (a `pid` label per live worker; a dead
  worker's series go when gunicorn's child_exit hook marks it dead).
- Exemplars: prometheus_client drops them in multiprocess mode. Each worker keeps the
  latest exemplar per histogram bucket and writes them, at most once a second, to
  `exemplars_<pid>.json` in the same directory; a scrape in OpenMetrics format merges all
  workers' files (newest wins) into the bucket samples. The trade-off: an exemplar shows up
  to a second after its request, and only the newest per bucket survives, which is all
  OpenMetrics keeps anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.samples import Exemplar

from api.telemetry import flusher, tallies

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

flush_pending = tallies.flush  # the flusher's, and a scrape's: increments into the files

# In multiprocess mode metrics are read back from the files, not from a registry.
REGISTRY = CollectorRegistry(auto_describe=True)
if MULTIPROC_DIR is None:
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)

# Buckets follow measured latencies (docs/BENCHMARKS.md): a cached answer takes ~3 ms, an
# extractive miss ~20 ms, a query embedding ~2 ms, a Chroma search ~2 ms, an LLM answer seconds.
HTTP_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
EMBED_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
)
RETRIEVE_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06, 0.125, 0.25, 0.5, 1)
GENERATE_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)

HTTP_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "Duration of HTTP server requests.",
    ["http_request_method", "http_route", "http_response_status_code"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)
HTTP_ACTIVE = Gauge(
    "http_server_active_requests",
    "Number of active HTTP server requests.",
    ["http_request_method"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
EMBED_DURATION = Histogram(
    "rag_embed_duration_seconds",
    "Time to embed texts, by what was embedded.",
    ["kind"],
    buckets=EMBED_BUCKETS,
    registry=REGISTRY,
)
RETRIEVE_DURATION = Histogram(
    "rag_retrieve_duration_seconds",
    "Time of the vector search.",
    buckets=RETRIEVE_BUCKETS,
    registry=REGISTRY,
)
GENERATE_DURATION = Histogram(
    "rag_generate_duration_seconds",
    "Time to generate a whole answer, by generator.",
    ["generator"],
    buckets=GENERATE_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "rag_time_to_first_token_seconds",
    "From the start of generation to its first text.",
    ["generator"],
    buckets=GENERATE_BUCKETS,
    registry=REGISTRY,
)
LLM_TOKENS = Counter(
    "rag_llm_tokens",
    "Tokens sent to and received from the LLM.",
    ["kind"],
    registry=REGISTRY,
)
CACHE_REQUESTS = Counter(
    "rag_cache_requests",
    "Cache lookups by layer (answer, embedding) and result.",
    ["layer", "result"],
    registry=REGISTRY,
)
INGESTED = Counter(
    "rag_ingest_documents",
    "Documents offered for ingestion, by result.",
    ["result"],
    registry=REGISTRY,
)
INGESTED_CHUNKS = Counter("rag_ingest_chunks", "Chunks written.", registry=REGISTRY)
ERRORS = Counter("rag_errors", "Errors answered to clients, by type.", ["type"], registry=REGISTRY)
BUILD_INFO = Gauge(
    "rag_build_info",
    "Version and components of the running service (always 1).",
    ["version", "python", "embedder", "generator"],
    multiprocess_mode="max",
    registry=REGISTRY,
)
WORKER_RSS = Gauge(
    "rag_worker_resident_memory_bytes",
    "Resident memory of each worker process.",
    multiprocess_mode="liveall",
    registry=REGISTRY,
)
WORKER_CPU = Gauge(
    "rag_worker_cpu_seconds",
    "CPU time used by each worker process so far.",
    multiprocess_mode="liveall",
    registry=REGISTRY,
)

_PAGE = os.sysconf("SC_PAGE_SIZE")


def sample_process() -> None:
    with open("/proc/self/statm", "rb") as statm:
        WORKER_RSS.set(int(statm.read().split()[1]) * _PAGE)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    WORKER_CPU.set(usage.ru_utime + usage.ru_stime)


class Exemplars:
    """The newest exemplar per histogram bucket, shared between workers through files.
    `tallies.Series` writes `latest` as it observes."""

    def __init__(self, directory: str | None) -> None:
        self._dir = Path(directory) if directory else None
        # (metric, labels, le) -> (trace_id, value, time); keyed by tuples on the request
        # path, turned into the files' JSON keys only when written or merged.
        self.latest: dict[tuple[str, tuple[tuple[str, str], ...], str], Any] = {}
        self.dirty = False

    @staticmethod
    def key(metric: str, labels: Iterable[tuple[str, str]], le: str) -> str:
        return json.dumps([metric, sorted(labels), le])

    def _local(self) -> dict[str, tuple[str, float, float]]:
        # copy() takes the keys before it allocates anything (an allocation can run the
        # garbage collector, and with it another thread): the request thread adds keys.
        return {self.key(*k): v for k, v in self.latest.copy().items()}

    def flush(self) -> None:
        if self._dir is None or not self.dirty:
            return
        self.dirty = False
        payload = json.dumps(self._local())
        path = self._dir / f"exemplars_{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(payload)
        tmp.replace(path)

    def snapshot(self) -> dict[str, tuple[str, float, float]]:
        merged: dict[str, tuple[str, float, float]] = {}
        files = sorted(self._dir.glob("exemplars_*.json")) if self._dir else []
        for path in files:
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError):  # a worker replacing its file right now
                continue
            for key, value in found.items():
                if key not in merged or value[2] > merged[key][2]:
                    merged[key] = (value[0], value[1], value[2])
        for key, value in self._local().items():
            if key not in merged or value[2] >= merged[key][2]:
                merged[key] = value
        return merged


EXEMPLARS = Exemplars(MULTIPROC_DIR)


def forget_worker(pid: int) -> None:
    """gunicorn's child_exit hook: drop a dead worker's live gauges and exemplars."""
    multiprocess.mark_process_dead(pid)
    if MULTIPROC_DIR:
        Path(MULTIPROC_DIR, f"exemplars_{pid}.json").unlink(missing_ok=True)


class _WithExemplars:
    def __init__(self, collectors: Iterable[Any]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        exemplars = EXEMPLARS.snapshot()
        for collector in self._collectors:
            for metric in collector.collect():
                if metric.type == "histogram" and exemplars:
                    metric.samples = [_attach(metric.name, s, exemplars) for s in metric.samples]
                yield metric


def _attach(name: str, sample: Any, exemplars: dict[str, tuple[str, float, float]]) -> Any:
    if not sample.name.endswith("_bucket"):
        return sample
    labels = {k: v for k, v in sample.labels.items() if k != "le"}
    found = exemplars.get(
        Exemplars.key(name, labels.items(), tallies.le(float(sample.labels["le"])))
    )
    if found is None:
        return sample
    trace_id, value, timestamp = found
    return sample._replace(exemplar=Exemplar({"trace_id": trace_id}, value, timestamp))


def exposition(accept: str, extra: Iterable[Any] = ()) -> tuple[bytes, str]:
    """The /metrics body: OpenMetrics (with exemplars) when the scraper asks for it."""
    # This worker's figures are fresh; the others' trail by a tick. A value its file cannot
    # take (a full tmpfs) waits for the next flush, and the flusher says so: the scrape
    # still answers, with what the files hold.
    with contextlib.suppress(Exception):
        flush_pending()
    if MULTIPROC_DIR:
        sample_process()  # and their RSS and CPU by seconds
        source = CollectorRegistry()
        multiprocess.MultiProcessCollector(source, MULTIPROC_DIR)
    else:
        source = REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WithExemplars([source, *extra]))
    if "application/openmetrics-text" in accept:
        return openmetrics.generate_latest(registry), openmetrics.CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST


def schedule() -> None:
    """Once per worker: its RSS/CPU gauges kept current and its exemplars written, by the
    telemetry flusher (api/telemetry/flusher.py)."""
    sample_process()
    flusher.every(1, flush_pending)
    flusher.every(10, EXEMPLARS.flush)
    flusher.every(50, sample_process)

"""The harness's own metrics, live, for Prometheus: what the load generator is doing while
it does it, so a dashboard can lay the offered load beside the service's own metrics.

Served by the Locust master (or the lone local process) on LOADTEST_METRICS_PORT. A run
against the native stack announces itself to the stack's Prometheus by writing the
`loadtest` job's file_sd targets (deployment/prometheus/prometheus.yml) and removes them
when it ends, so Prometheus scrapes a load test only while one runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from loadtest.hdr import Aggregate


class LiveCollector:
    """Read at scrape time from Locust's stats and the HDR aggregate: nothing is kept twice."""

    def __init__(
        self,
        stats: Callable[[], list[tuple[str, int, int]]],
        users: Callable[[], int],
        aggregate: Aggregate,
        run_id: str,
    ) -> None:
        self._stats, self._users, self._aggregate, self._run = stats, users, aggregate, run_id

    def collect(self) -> Iterator[Metric]:
        run = {"run_id": self._run}
        requests = CounterMetricFamily(
            "loadtest_requests", "Requests sent, by entry.", labels=["run_id", "entry"]
        )
        failures = CounterMetricFamily(
            "loadtest_failures", "Requests failed, by entry.", labels=["run_id", "entry"]
        )
        for name, sent, failed in self._stats():
            requests.add_metric([self._run, name], sent)
            failures.add_metric([self._run, name], failed)
        yield requests
        yield failures
        users = GaugeMetricFamily("loadtest_users", "Simulated users now.", labels=list(run))
        users.add_metric([self._run], self._users())
        yield users
        latency = GaugeMetricFamily(
            "loadtest_latency_recent_seconds",
            "Latency over the last 10 s from the HDR histograms, by entry and quantile.",
            labels=["run_id", "entry", "quantile"],
        )
        for name, hist in self._aggregate.recent(10.0).items():
            if not hist.get_total_count():  # only failures: no latency, not a latency of 0
                continue
            for quantile in (0.5, 0.95, 0.99):
                value = hist.get_value_at_percentile(quantile * 100) / 1e6
                latency.add_metric([self._run, name, str(quantile)], value)
        yield latency
        generator = self._aggregate.generator_summary()
        cpu = GaugeMetricFamily(
            "loadtest_generator_cpu_ratio",
            "CPU of the busiest Locust process, as a share of one core.",
            labels=list(run),
        )
        cpu.add_metric([self._run], generator["busiest_process_cpu"])
        yield cpu
        sends = CounterMetricFamily(
            "loadtest_open_model_sends",
            "Open model: sends by outcome (late ones were sent too).",
            labels=["run_id", "outcome"],
        )
        for outcome in ("sent", "late", "dropped"):
            sends.add_metric([self._run, outcome], generator[outcome])
        yield sends


def serve(collector: LiveCollector, port: int) -> int:
    """Start the endpoint on 127.0.0.1; returns the port (a free one if `port` is 0)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    bound: int = server.server_address[1]
    return bound


def announce(targets_dir: Path | None, port: int) -> Path | None:
    """Tell the stack's Prometheus (file_sd) where this run's metrics are."""
    if targets_dir is None or not targets_dir.is_dir():
        return None
    path = targets_dir / "loadtest.json"
    # No target labels: the metrics carry run_id themselves (a target label of the same
    # name would push theirs aside as exported_run_id).
    groups: list[dict[str, Any]] = [{"targets": [f"127.0.0.1:{port}"]}]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)  # file_sd must never read a half-written file
    return path


def withdraw(path: Path | None) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("[]")
        tmp.replace(path)

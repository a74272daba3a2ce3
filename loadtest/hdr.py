"""Every latency in an HDR histogram, merged across Locust's worker processes.

Locust rounds what it keeps (to two significant digits above 100 ms) and its percentiles
come from those rounded buckets. Here each request event's exact time goes into an
HdrHistogram (1 µs to 1 hour, 3 significant digits: within 0.1% anywhere in that range).
A worker ships what it recorded since its last report inside Locust's own report to the
master (`report_to_master` / `worker_report`), encoded; the master merges them into run
totals and into one histogram per reporting interval, for the latency-over-time plot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
DIGITS = 3
# Request types that are not HTTP requests but a measurement inside one (the time to the
# first streamed token): reported, but not counted as requests.
DERIVED = "TTFT"


def histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def encode(hist: HdrHistogram) -> str:
    raw = hist.encode()
    return raw.decode() if isinstance(raw, bytes) else str(raw)


PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}


def summarize(hist: HdrHistogram, requests: int, failures: int, seconds: float) -> dict[str, Any]:
    """A histogram's figures as the report gives them: counts, rate, percentiles in ms of
    the successful requests (None when none succeeded: a dead target's instant refusals
    must not read as good latency)."""
    figures: dict[str, Any] = {
        "requests": requests,
        "failures": failures,
        "rps": round(requests / seconds, 3) if seconds > 0 else 0.0,
    }
    measured = hist.get_total_count() > 0
    for key, percentile in PERCENTILES.items():
        figures[key] = (
            round(hist.get_value_at_percentile(percentile) / 1000, 3) if measured else None
        )
    figures["max"] = round(hist.get_max_value() / 1000, 3) if measured else None
    figures["samples"] = hist.get_total_count()
    return figures


def decode(text: str) -> HdrHistogram:
    hist = histogram()
    hist.decode_and_add(text)
    return hist


class Recorder:
    """What this process measured since it last handed its figures on."""

    def __init__(self) -> None:
        self._pending: dict[str, HdrHistogram] = {}
        self._failures: dict[str, int] = {}
        self.kinds: dict[str, str] = {}

    def record(self, name: str, request_type: str, milliseconds: float, failed: bool) -> None:
        """A failure is counted, its time is not: a refused connection or a 502 in 1 ms
        would pull the percentiles down exactly when the target is failing."""
        hist = self._pending.get(name)
        if hist is None:
            hist = self._pending[name] = histogram()
            self.kinds[name] = request_type
        if failed:
            self._failures[name] = self._failures.get(name, 0) + 1
            return
        hist.record_value(min(HIGHEST_US, max(LOWEST_US, round(milliseconds * 1000))))

    def take(self) -> dict[str, Any]:
        pending, self._pending = self._pending, {}
        failures, self._failures = self._failures, {}
        return {
            "histograms": {name: encode(h) for name, h in pending.items()},
            "failures": failures,
            "kinds": dict(self.kinds),
        }


class Aggregate:
    """The master's view: totals per entry and per reporting interval, the load
    generator's own health, and (for the breakpoint shape) where the SLO broke."""

    WINDOW_S = 3.0

    def __init__(self) -> None:
        self.totals: dict[str, HdrHistogram] = {}
        self.kinds: dict[str, str] = {}
        # Kept encoded (~100 bytes each): decoded, a histogram is ~200 KB, and an hour's
        # soak has thousands of intervals.
        self.intervals: list[tuple[float, dict[str, str], int]] = []
        self.generators: dict[str, list[dict[str, Any]]] = {}  # first and latest report
        self.breakpoint: dict[str, Any] | None = None
        self.windows: list[dict[str, Any]] = []

    def add(self, payload: dict[str, Any], at: float | None = None, source: str = "local") -> None:
        at = time.time() if at is None else at
        self.kinds.update(payload.get("kinds", {}))
        interval: dict[str, str] = {}
        for name, text in payload.get("histograms", {}).items():
            self.totals.setdefault(name, histogram()).add(decode(text))
            interval[name] = text
        failures = sum(
            n for name, n in payload.get("failures", {}).items() if self.kinds.get(name) != DERIVED
        )
        if interval:
            self.intervals.append((at, interval, failures))
        if generator := payload.get("generator"):
            seen = self.generators.setdefault(source, [generator])
            seen[1:] = [generator]

    def _since(self, seconds: float) -> Iterator[tuple[float, dict[str, str], int]]:
        """The intervals of the last `seconds`, newest first: a long soak holds thousands,
        and only the last few are wanted."""
        now = time.time()
        for interval in reversed(self.intervals):
            if now - interval[0] > seconds:
                return
            yield interval

    def recent(self, seconds: float) -> dict[str, HdrHistogram]:
        """Each entry's latencies over the last `seconds`, merged."""
        merged = dict[str, HdrHistogram]()
        for _, hists, _ in self._since(seconds):
            for name, text in hists.items():
                merged.setdefault(name, histogram()).decode_and_add(text)
        return merged

    def generator_summary(self) -> dict[str, Any]:
        """The load generator's own CPU use per process, and the open model's sends."""
        busiest = 0.0
        sends = {"sent": 0, "late": 0, "dropped": 0, "max_late_s": 0.0}
        for reports in self.generators.values():
            first, last = reports[0], reports[-1]
            if last["at"] > first["at"]:
                busiest = max(
                    busiest,
                    (last["cpu_seconds"] - first["cpu_seconds"]) / (last["at"] - first["at"]),
                )
            for key in ("sent", "late", "dropped"):
                sends[key] += last.get(key, 0)
            sends["max_late_s"] = max(sends["max_late_s"], last.get("max_late_s", 0.0))
        # One Locust process runs on one core: near 100% it measures itself, not the server.
        return {"busiest_process_cpu": round(busiest, 3), "saturated": busiest > 0.9, **sends}

    def check_breakpoint(self, slo: dict[str, float], users: int) -> None:
        """Judge the last few seconds against the `total` limits; remember the first breach
        and the best rate sustained before it."""
        merged, failures = histogram(), 0
        for _, hists, failed in self._since(self.WINDOW_S):
            failures += failed
            for name, text in hists.items():
                if self.kinds.get(name) != DERIVED:
                    merged.decode_and_add(text)
        count = merged.get_total_count() + failures  # the histogram holds successes only
        if count < 20:  # too few to judge
            return
        window = summarize(merged, count, failures, self.WINDOW_S)
        # Under the SLO's names (report.SLO_KEYS). min_rps is not judged here: a ramp's
        # early, light seconds would always break it.
        judged = {f"{k}_ms": window[k] for k in (*PERCENTILES, "max")}
        judged["error_rate"] = failures / count
        broken = [
            f"{key} {'(none succeeded)' if judged[key] is None else f'{judged[key]:.3f}'} > {limit}"
            for key, limit in slo.items()
            if key in judged and (judged[key] is None or judged[key] > limit)
        ]
        if broken:
            best = max(self.windows, key=lambda w: w["rps"], default={"rps": 0.0, "users": 0})
            self.breakpoint = {
                "users": users,
                "breaches": broken,
                "max_sustainable_rps": best["rps"],
                "users_at_max": best["users"],
            }
        else:
            self.windows.append({"users": users, "rps": window["rps"]})

    def dump(self, path: Path, extra: dict[str, Any]) -> None:
        path.write_text(
            json.dumps(
                {
                    **extra,
                    "generator": self.generator_summary(),
                    "breakpoint": self.breakpoint,
                    "kinds": self.kinds,
                    "totals": {name: encode(h) for name, h in self.totals.items()},
                    "intervals": [[at, hists] for at, hists, _ in self.intervals],
                }
            )
        )

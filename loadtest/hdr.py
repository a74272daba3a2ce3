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


def decode(text: str) -> HdrHistogram:
    hist = histogram()
    hist.decode_and_add(text)
    return hist


class Recorder:
    """What this process measured since it last handed its figures on."""

    def __init__(self) -> None:
        self._pending: dict[str, HdrHistogram] = {}
        self.kinds: dict[str, str] = {}

    def record(self, name: str, request_type: str, milliseconds: float) -> None:
        hist = self._pending.get(name)
        if hist is None:
            hist = self._pending[name] = histogram()
            self.kinds[name] = request_type
        hist.record_value(min(HIGHEST_US, max(LOWEST_US, round(milliseconds * 1000))))

    def take(self) -> dict[str, Any]:
        pending, self._pending = self._pending, {}
        return {
            "histograms": {name: encode(h) for name, h in pending.items()},
            "kinds": dict(self.kinds),
        }


class Aggregate:
    """The master's view: totals per entry and per reporting interval."""

    def __init__(self) -> None:
        self.totals: dict[str, HdrHistogram] = {}
        self.kinds: dict[str, str] = {}
        self.intervals: list[tuple[float, dict[str, HdrHistogram]]] = []

    def add(self, payload: dict[str, Any], at: float | None = None) -> None:
        at = time.time() if at is None else at
        self.kinds.update(payload.get("kinds", {}))
        interval: dict[str, HdrHistogram] = {}
        for name, text in payload.get("histograms", {}).items():
            part = decode(text)
            self.totals.setdefault(name, histogram()).add(part)
            interval[name] = part
        if interval:
            self.intervals.append((at, interval))

    def dump(self, path: Path, extra: dict[str, Any]) -> None:
        path.write_text(
            json.dumps(
                {
                    **extra,
                    "kinds": self.kinds,
                    "totals": {name: encode(h) for name, h in self.totals.items()},
                    "intervals": [
                        [at, {name: encode(h) for name, h in hists.items()}]
                        for at, hists in self.intervals
                    ],
                }
            )
        )

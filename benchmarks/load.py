"""Closed-loop HTTP load: N clients, each sending its next request when the last returns."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import httpx


def closed_loop(
    base: str, make_body: Callable[[int], dict[str, object]], seconds: float, concurrency: int
) -> tuple[float, float, int]:
    """Closed-loop load: `concurrency` clients, each sending the next request on reply."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    counter = iter(range(10**9))

    def client() -> None:
        nonlocal errors
        with httpx.Client(base_url=base, timeout=30) as http:
            while time.monotonic() < stop:
                with lock:
                    n = next(counter)
                start = time.perf_counter()
                response = http.post("/query", json=make_body(n))
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors += response.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    p50 = statistics.median(latencies) * 1000
    return len(latencies) / wall, p50, errors

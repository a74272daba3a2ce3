"""`make bench`, part four: the production layout's ceiling against cached `/query`.

A native stack (deployment/stack.py: nginx least_conn over 2 replicas of gunicorn with one
uvicorn worker each, Redis, Chroma, the LLM server) on free ports; wrk sends, through
nginx, alternately `GET /health` (touches nothing: what nginx + gunicorn + FastAPI can
carry) and a cached `POST /query` (the answer comes from Redis), rounds alternating so
drift hits both alike. Everything shares the machine's cores with wrk.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import httpx

from benchmarks.wrk import wrk
from deployment import stack as native
from tests.servers import stack_on_free_ports

QUESTION: dict[str, object] = {"question": "How do I restore a backup?"}


def measure(
    rounds: int = 3, seconds: float = 10, connections: int = 32, workers: int = 1
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        topology = stack_on_free_ports(Path(tmp) / "stack", replicas=2, workers=workers)
        native.up(topology, timeout=300)
        rates: dict[str, list[float]] = {"health": [], "query": []}
        try:
            httpx.post(f"{topology.url}/query", json=QUESTION, timeout=120).raise_for_status()
            for i in range(rounds):
                order = ["health", "query"] if i % 2 == 0 else ["query", "health"]
                for name in order:
                    if name == "health":
                        result = wrk(f"{topology.url}/health", seconds, connections)
                    else:
                        result = wrk(f"{topology.url}/query", seconds, connections, QUESTION)
                    if result.errors:
                        raise RuntimeError(f"{name}: {result.errors} errors")
                    rates[name].append(result.rps)
        finally:
            native.down(topology)
    health, query = statistics.mean(rates["health"]), statistics.mean(rates["query"])
    return {
        "health_rps": health,
        "query_rps": query,
        "ratio": query / health,
        "rounds": rounds,
        "seconds": seconds,
        "connections": connections,
        "workers": workers,
    }


def report(result: dict[str, float]) -> None:
    print(
        f"\nthrough nginx, 2 replicas x {result['workers']:.0f} worker, wrk "
        f"{result['connections']:.0f} connections, {result['rounds']:.0f} alternating rounds "
        f"of {result['seconds']:.0f} s:"
    )
    print(f"  GET /health (the layout's ceiling): {result['health_rps']:8.1f} req/s")
    print(f"  POST /query, cached:                {result['query_rps']:8.1f} req/s")
    print(f"target: cached /query >= 60% of /health: {result['ratio'] * 100:.1f}%")


if __name__ == "__main__":
    report(measure())

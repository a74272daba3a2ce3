"""`make bench`, part three: what observability costs on the cached `/query` path.

Two copies of the service side by side, one gunicorn worker each, the same corpus and
Redis: one with everything on (traces sampled at 100% and exported over OTLP/HTTP,
Prometheus metrics in multiprocess mode, the JSON access log), one with everything off
(OTEL_SDK_DISABLED=true, METRICS_ENABLED=false, ACCESS_LOG=false). Closed-loop clients
alternate between them in several rounds so drift on the machine hits both alike. The OTLP
endpoint is a sink that reads and discards, standing in for a collector on another host.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from benchmarks.load import closed_loop
from tests.servers import ApiServer, RedisServer

QUESTION: dict[str, object] = {"question": "How do I restore a backup?"}


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _server(tmp: Path, name: str, redis_url: str, env: dict[str, str]) -> ApiServer:
    return ApiServer(
        tmp,
        name,
        DATA_DIR=str(tmp / name),
        REDIS_URL=redis_url,
        GENERATOR="extractive",
        LOG_LEVEL="info",
        **env,
    )


def measure(rounds: int = 3, seconds: float = 10, concurrency: int = 4) -> dict[str, float]:
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        on = _server(
            tmp,
            "on",
            redis_server.url,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
                "OTEL_TRACES_SAMPLER": "always_on",
                "OTEL_SDK_DISABLED": "false",
                "METRICS_ENABLED": "true",
                "ACCESS_LOG": "true",
            },
        )
        off = _server(
            tmp,
            "off",
            redis_server.url,
            {"OTEL_SDK_DISABLED": "true", "METRICS_ENABLED": "false", "ACCESS_LOG": "false"},
        )
        rates: dict[str, list[float]] = {"on": [], "off": []}
        try:
            for server in (on, off):
                server.start()
                httpx.post(f"{server.base}/query", json=QUESTION, timeout=60)  # fill the cache
            for i in range(rounds):
                order = [("on", on.base), ("off", off.base)]
                for name, url in order if i % 2 == 0 else order[::-1]:
                    rps, _, errors = closed_loop(url, lambda n: QUESTION, seconds, concurrency)
                    assert errors == 0
                    rates[name].append(rps)
        finally:
            on.stop()
            off.stop()
            redis_server.stop()
            sink.shutdown()
    on_rps, off_rps = statistics.mean(rates["on"]), statistics.mean(rates["off"])
    return {
        "on_rps": on_rps,
        "off_rps": off_rps,
        "overhead": 1 - on_rps / off_rps,
        "rounds": rounds,
        "seconds": seconds,
        "concurrency": concurrency,
    }


def report(result: dict[str, float]) -> None:
    print(
        f"\ninstrumentation overhead, cached /query, 1 worker, {result['concurrency']:.0f} "
        f"clients, {result['rounds']:.0f} alternating rounds of {result['seconds']:.0f} s:"
    )
    print(f"  everything on:  {result['on_rps']:7.1f} req/s")
    print(f"  everything off: {result['off_rps']:7.1f} req/s")
    print(f"target: <= 10% fewer requests/s: {result['overhead'] * 100:.1f}% fewer")


if __name__ == "__main__":
    report(measure())

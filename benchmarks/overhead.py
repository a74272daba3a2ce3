"""`make bench`, part three: what observability costs on the cached `/query` path.

Three copies of the service side by side, one gunicorn worker each, the same corpus and
Redis: one with everything on (traces sampled at 100% and exported over OTLP/HTTP through
the span relay, Prometheus metrics in multiprocess mode, the JSON access log), the same
with one trace in ten sampled, and one with everything off (OTEL_SDK_DISABLED=true,
METRICS_ENABLED=false, ACCESS_LOG=false). wrk drives them in rotating rounds so drift on
the machine hits all alike. The OTLP
endpoint is a sink that reads and discards, standing in for a collector on another host.
The span relay's own CPU is reported too: it is work moved off the worker, not work gone.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from benchmarks.wrk import wrk
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


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _relay_pid(server: ApiServer) -> int:
    """The `api.telemetry.relay` process started by this server's gunicorn master (in a
    session of its own, so its ancestry, not its group, says whose it is)."""
    assert server.proc is not None
    for proc in Path("/proc").iterdir():
        try:
            if b"api.telemetry.relay" not in (proc / "cmdline").read_bytes():
                continue
            if _parent(_parent(int(proc.name))) == server.proc.pid:  # runner → master → relay
                return int(proc.name)
        except (OSError, ValueError):
            continue
    raise RuntimeError("no span relay found under the instrumented server")


def cpu_seconds(pid: int) -> float:
    """A process's user and system CPU so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(rounds: int = 4, seconds: float = 10, concurrency: int = 4) -> dict[str, float]:
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    everything = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SDK_DISABLED": "false",
        "METRICS_ENABLED": "true",
        "ACCESS_LOG": "true",
    }
    configs = {
        "on": everything,
        # The same, but one request in ten traced: what a busy deployment would run.
        "sampled": {
            **everything,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
        "off": {"OTEL_SDK_DISABLED": "true", "METRICS_ENABLED": "false", "ACCESS_LOG": "false"},
    }
    rates: dict[str, list[float]] = {name: [] for name in configs}
    relay_cpu = requests_on = 0.0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        servers = {name: _server(tmp, name, redis_server.url, env) for name, env in configs.items()}
        try:
            for server in servers.values():
                server.start()
                httpx.post(f"{server.base}/query", json=QUESTION, timeout=60)  # fill the cache
            relay = _relay_pid(servers["on"])
            names = list(servers)
            for i in range(rounds):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    before = cpu_seconds(relay)
                    result = wrk(f"{servers[name].base}/query", seconds, concurrency, QUESTION)
                    assert result.errors == 0, result
                    rates[name].append(result.rps)
                    if name == "on":
                        relay_cpu += cpu_seconds(relay) - before
                        requests_on += result.requests
        finally:
            for server in servers.values():
                server.stop()
            redis_server.stop()
            sink.shutdown()
    mean = {name: statistics.mean(values) for name, values in rates.items()}
    return {
        "on_rps": mean["on"],
        "sampled_rps": mean["sampled"],
        "off_rps": mean["off"],
        "overhead": 1 - mean["on"] / mean["off"],
        "overhead_sampled": 1 - mean["sampled"] / mean["off"],
        "relay_us_per_request": relay_cpu / requests_on * 1e6,
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
    print(
        f"  on, 10% traced: {result['sampled_rps']:7.1f} req/s "
        f"({result['overhead_sampled'] * 100:.1f}% fewer than off)"
    )
    relay = result["relay_us_per_request"]
    print(f"  span relay CPU: {relay:.0f} µs per request, in its own process")
    print(f"target: <= 10% fewer requests/s: {result['overhead'] * 100:.1f}% fewer")


if __name__ == "__main__":
    report(measure())

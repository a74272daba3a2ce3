"""`make bench`, part three: what observability costs on the cached `/query` path.

Copies of the service side by side, one gunicorn worker each, the same corpus and Redis:
- "on": everything (traces sampled at 100% and exported over OTLP/HTTP through the span
  relay, Prometheus metrics in multiprocess mode, the JSON access log);
- "sampled": the same with one trace in ten sampled, as a busy deployment would run;
- "ids": tracing with no exporter and nothing else: spans are contexts only, so this is
  the price of trace and span ids on every request, the least any tracing can cost here;
- "off": everything off (OTEL_SDK_DISABLED=true, METRICS_ENABLED=false, ACCESS_LOG=false);
- "logs": "off" as issue 4 words it, OTEL_SDK_DISABLED=true and metrics off, so the access
  log stays on, as it does in any production service; the headline stays against "off",
  the stricter baseline, and this one is printed beside it;
- "off, again": a second "off", the control: how far two identical servers measure apart
  in this run is the resolution of every other figure.
wrk drives them in rounds of fresh processes. Within a round each server is loaded in
several short slices, in a new (seeded) order each pass, so that drift on the machine (two
4 s windows of the same server measured up to 15% apart on this VM) and whichever server
ran just before hit all alike; each round then gives one paired figure per setting (its
requests/s against "off" in the same round), and the rounds give its mean and a 95%
confidence interval (Student's t), which is what a claim about the target rests on. A
slice's last spans reach the relay (and the relay's CPU) during the slices after it; the
relay's CPU is counted per round, so it is all counted, but slices are not independent of
each other in that. The workers,
every thread of them, run on the first CPU (one is loaded at a time; the others sleep)
and everything else (wrk, Redis, the span relay, the gunicorn masters) on the rest: left
to the scheduler, the worker under load shared its core with whatever woke next to it,
and two identical servers measured 6% apart. What a worker does on its own core is what
the throughput figures measure; what the relay spends on another core is reported beside
them. The OTLP
endpoint is a sink that reads and discards, standing in for a collector on another host.
The span relay's own CPU is reported too: it is work moved off the worker, not work gone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from benchmarks.wrk import wrk
from tests.servers import ROOT, ApiServer, RedisServer, descendants, parent

QUESTION: dict[str, object] = {"question": "How do I restore a backup?"}
Config = tuple[dict[str, str], Path]  # a server's environment, and the checkout it runs
RELAY_SETTLE_S = 5.5


class _Sink(BaseHTTPRequestHandler):
    # Keep-alive, as a collector's OTLP/HTTP receiver: with HTTP/1.0 the relay opened a
    # connection, and this server a thread, for every batch.
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _server(
    tmp: Path, name: str, redis_url: str, env: dict[str, str], checkout: Path = ROOT
) -> ApiServer:
    server = ApiServer(
        tmp,
        name,
        DATA_DIR=str(tmp / name),
        REDIS_URL=redis_url,
        GENERATOR="extractive",
        LOG_LEVEL="info",
        **env,
    )
    server.cwd = checkout  # the code it runs; the model, corpus and venv stay this one's
    return server


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid`: on Linux, affinity belongs to a thread, not a process (a
    worker's flusher and span sender threads exist before the benchmark sees it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def _under_master(server: ApiServer, command: bytes) -> list[int]:
    """The processes the server's gunicorn master started (runner → master → them) whose
    command line holds `command`. The relay runs in a session of its own, so ancestry,
    not the process group, says whose it is."""
    assert server.proc is not None
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and command in (proc / "cmdline").read_bytes()
                and parent(parent(int(proc.name))) == server.proc.pid
            ):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def _workers(server: ApiServer) -> list[int]:
    return _under_master(server, b"gunicorn")  # the relay's command line does not say it


def _relay_pid(server: ApiServer) -> int | None:
    found = _under_master(server, b"api.telemetry.relay")
    return found[0] if found else None


def _start_all(
    tmp: Path, redis_url: str, configs: dict[str, Config], cpus: set[int]
) -> dict[str, ApiServer]:
    """Every configuration's server, started on all CPUs (start-up is not measured), each
    with the one question's answer cached."""
    tmp.mkdir()
    servers: dict[str, ApiServer] = {}
    load = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        for name, (env, checkout) in configs.items():
            slug = name.replace(", ", "-").replace(" ", "-")
            servers[name] = server = _server(tmp, slug, redis_url, env, checkout)
            server.start()
            httpx.post(f"{server.base}/query", json=QUESTION, timeout=60)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    finally:
        os.sched_setaffinity(0, load)
    return servers


def cpu_seconds(pid: int) -> float:
    """A process's user and system CPU so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def everything_on(endpoint: str) -> dict[str, str]:
    """Traces sampled at 100% and exported to `endpoint`, metrics, the access log."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SDK_DISABLED": "false",
        "METRICS_ENABLED": "true",
        "ACCESS_LOG": "true",
    }


OFF = {"OTEL_SDK_DISABLED": "true", "METRICS_ENABLED": "false", "ACCESS_LOG": "false"}


def _settings(endpoint: str) -> dict[str, dict[str, str]]:
    everything = everything_on(endpoint)
    return {
        "on": everything,
        # The same, but one request in ten traced: what a busy deployment would run.
        "sampled": {
            **everything,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
        "ids": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",  # whatever the caller's environment says
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
            "OTEL_SDK_DISABLED": "false",
            "OTEL_TRACES_SAMPLER": "always_on",
            "METRICS_ENABLED": "false",
            "ACCESS_LOG": "false",
        },
        "off": OFF,
        "logs": {**OFF, "ACCESS_LOG": "true"},
        "off, again": OFF,
    }


def interval(values: list[float]) -> tuple[float, float, float]:
    """The mean of per-round figures and its 95% confidence interval (low, mean, high);
    one round gives no interval (low = high = the mean)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean, mean
    # Imported here: scipy takes seconds to import, and the servers' OTLP sink imports
    # this module.
    from scipy.stats import t as student

    # Student's t, two-sided 95%, with n - 1 degrees of freedom.
    half = student.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean - half, mean, mean + half


def paired(rates: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    """How many fewer requests/s `name` served than `base`, round by round, as a share
    of `base`'s: its mean over the rounds and 95% confidence interval."""
    return interval([1 - a / b for a, b in zip(rates[name], rates[base], strict=True)])


def added_us(cpu: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    """How many µs of worker CPU a request of `name` cost over one of `base`, round by
    round (`cpu`: seconds per request, per round): its mean and 95% confidence interval."""
    return interval([(a - b) * 1e6 for a, b in zip(cpu[name], cpu[base], strict=True)])


def us_per_request(cpu: dict[str, list[float]]) -> dict[str, float]:
    """Each setting's CPU per request in µs (`cpu`: seconds per request, per round): the
    mean of its rounds, as `added_us` is the mean of their differences, so the two agree
    exactly."""
    return {name: statistics.mean(values) * 1e6 for name, values in cpu.items()}


def measure(
    rounds: int = 6, seconds: float = 10, concurrency: int = 4, slices: int = 5
) -> dict[str, Any]:
    figures = run(
        lambda endpoint: {name: (env, ROOT) for name, env in _settings(endpoint).items()},
        rounds,
        seconds,
        concurrency,
        slices,
    )
    rates, busy = figures["rates"], figures["busy"]
    mean = {name: statistics.mean(values) for name, values in rates.items()}
    return {
        "on_rps": mean["on"],
        "sampled_rps": mean["sampled"],
        "ids_rps": mean["ids"],
        "off_rps": mean["off"],
        "logs_rps": mean["logs"],
        "off_again_rps": mean["off, again"],
        # How many fewer requests/s each setting served than off, paired round by round:
        # (low, mean, high) of the 95% confidence interval. "on_against_logs" is against
        # the access log alone, issue 4's "off"; "control" is off against itself.
        "paired": {
            "on": paired(rates, "on", "off"),
            "on_against_logs": paired(rates, "on", "logs"),
            "sampled": paired(rates, "sampled", "off"),
            "ids": paired(rates, "ids", "off"),
            "logs": paired(rates, "logs", "off"),
            "control": paired(rates, "off, again", "off"),
        },
        "worker_us_added": added_us(figures["cpu"], "on", "off"),
        # The worker's CPU over the wall time: near 1 means the worker, not the load
        # generator or the machine, set the pace.
        "worker_busy": {name: statistics.mean(values) for name, values in busy.items()},
        # The same cost in the worker's CPU per request, which does not depend on whether
        # the load generator kept the worker busy.
        "worker_us_per_request": us_per_request(figures["cpu"]),
        # What the span relay spends on another core. With a replica's every core running
        # a worker, as in production, the relay takes its CPU from them: worker and relay
        # together are what a saturated replica pays per request.
        "relay_us_per_request": us_per_request(figures["relay_cpu"]),
        "rounds": rounds,
        "seconds": seconds,
        "slices": slices,
        "concurrency": concurrency,
    }


def _exports(env: dict[str, str]) -> bool:
    return env.get("OTEL_SDK_DISABLED") != "true" and bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def run(
    configs_for: Callable[[str], dict[str, Config]],
    rounds: int,
    seconds: float,
    concurrency: int,
    slices: int = 1,
) -> dict[str, Any]:
    """Each configuration (`configs_for(the OTLP sink's endpoint)`) served by one worker,
    loaded by wrk for `seconds` a round, in `slices` shuffled passes: per configuration,
    each round's requests/s, worker busy share, and worker and span relay CPU seconds per
    request (0 for a server without a relay)."""
    if slices < 1 or seconds / slices < 1 or seconds % slices:
        raise ValueError("wrk runs whole seconds: `seconds` must be a multiple of `slices`")
    everywhere = os.sched_getaffinity(0)
    cpus = sorted(everywhere)
    workers_cpu, others = {cpus[0]}, set(cpus[1:]) or {cpus[0]}
    # From here on this thread, and what it starts (the sink's threads, Redis, wrk), runs
    # on the CPUs the measured workers do not.
    os.sched_setaffinity(0, others)
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        configs = configs_for(f"http://127.0.0.1:{sink.server_address[1]}")
        return _run(configs, rounds, seconds, slices, concurrency, everywhere, workers_cpu, others)
    finally:
        sink.shutdown()
        os.sched_setaffinity(0, everywhere)


def _run(  # noqa: PLR0917
    configs: dict[str, Config],
    rounds: int,
    seconds: float,
    slices: int,
    concurrency: int,
    everywhere: set[int],
    workers_cpu: set[int],
    others: set[int],
) -> dict[str, Any]:
    exporting = [name for name, (env, _) in configs.items() if _exports(env)]
    rates: dict[str, list[float]] = {name: [] for name in configs}
    busy: dict[str, list[float]] = {name: [] for name in configs}
    # CPU seconds per request, per round: the worker's, and the span relay's
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    relay_cpu: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(tmp / "redis")
        try:
            redis_server.start()
            order = random.Random(4)  # a fixed seed: reruns shuffle alike
            for i in range(rounds):
                # Fresh processes every round: a process's memory layout and hash seed
                # alone moved one server's rate by several percent for its whole life.
                servers = _start_all(tmp / f"round-{i}", redis_server.url, configs, everywhere)
                try:
                    workers = {name: _workers(server) for name, server in servers.items()}
                    for name, server in servers.items():
                        assert workers[name], "no gunicorn worker found"
                        assert server.proc is not None
                        for pid in [server.proc.pid, *descendants(server.proc.pid)]:
                            _pin(pid, workers_cpu if pid in workers[name] else others)
                    relays = {name: _relay_pid(server) for name, server in servers.items()}
                    for name in exporting:
                        if relays[name] is None:
                            raise RuntimeError(f"no span relay found under the {name!r} server")
                    # Each relay's pid and its CPU so far.
                    before = {
                        name: (relay, cpu_seconds(relay)) for name, relay in relays.items() if relay
                    }
                    requests = dict.fromkeys(servers, 0)
                    worked = dict.fromkeys(servers, 0.0)
                    elapsed = dict.fromkeys(servers, 0.0)  # as wrk timed its slices
                    # A new order every pass: a server measured right after another runs
                    # with the same code already warm in the core's caches (a fixed
                    # rotation always put "off, again" after "off", which then measured
                    # 2-6% faster than "off" itself).
                    for _ in range(slices):
                        for name in order.sample(list(servers), len(servers)):
                            start = sum(cpu_seconds(pid) for pid in workers[name])
                            url = f"{servers[name].base}/query"
                            result = wrk(url, seconds / slices, concurrency, QUESTION)
                            worked[name] += sum(cpu_seconds(pid) for pid in workers[name]) - start
                            assert result.errors == 0 and result.requests > 0, result
                            requests[name] += result.requests
                            elapsed[name] += result.requests / result.rps
                    for name in servers:
                        rates[name].append(requests[name] / elapsed[name])
                        busy[name].append(worked[name] / elapsed[name])
                        cpu[name].append(worked[name] / requests[name])
                    if before:
                        # The workers send a batch every 5 s (OTEL_BSP_SCHEDULE_DELAY):
                        # the round's last spans reach the relay after wrk is done.
                        time.sleep(RELAY_SETTLE_S)
                    for name in servers:
                        relay_spent = 0.0
                        if name in before:
                            relay_spent = cpu_seconds(before[name][0]) - before[name][1]
                        relay_cpu[name].append(relay_spent / requests[name])
                finally:
                    for server in servers.values():
                        server.stop()
        finally:
            redis_server.stop()
    return {
        "rates": rates,
        "busy": busy,
        "cpu": cpu,
        "relay_cpu": relay_cpu,
    }


def shown(figure: tuple[float, float, float], spec: str = ".1%", unit: str = "") -> str:
    """An interval's (low, mean, high) as "mean [low, high]"; one round has no interval
    to print, just its mean."""
    low, mean, high = figure
    text = f"{mean:{spec}}{unit}"
    return text if low == high else f"{text} [{low:{spec}}, {high:{spec}}]"


def report(result: dict[str, Any]) -> None:
    print(
        f"\ninstrumentation overhead, cached /query, 1 worker, {result['concurrency']:.0f} "
        f"clients, {result['rounds']:.0f} rounds of {result['seconds']:.0f} s a server "
        f"in {result['slices']:.0f} shuffled slices; fewer requests/s than off, paired round "
        "by round: mean [95% confidence interval]"
    )
    fewer = result["paired"]
    rows = (
        ("everything on", "on_rps", "on"),
        ("on, 10% traced", "sampled_rps", "sampled"),
        ("trace ids only", "ids_rps", "ids"),
        ("access log only", "logs_rps", "logs"),
        ("everything off", "off_rps", None),
        ("off, again", "off_again_rps", "control"),
    )
    for label, rate, key in rows:
        line = f"  {label + ':':16s} {result[rate]:7.1f} req/s"
        if key is not None:
            line += f"  {shown(fewer[key])}"
        print(line + ("  (the control: this run's resolution)" if key == "control" else ""))
    busy = ", ".join(f"{name} {share:.0%}" for name, share in result["worker_busy"].items())
    print(f"  worker busy:    {busy}")
    cpu = result["worker_us_per_request"]
    print(
        "  worker CPU per request: "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in cpu.items())
    )
    added = shown(result["worker_us_added"], "+.1f", " µs")
    print(f"  worker CPU added by everything on: {added}")
    relay = result["relay_us_per_request"]
    print(
        f"  span relay CPU per request, in its own process: on {relay['on']:.0f} µs, "
        f"10% traced {relay['sampled']:.0f} µs"
    )
    print("  all cores busy (worker and relay CPU together, as a saturated replica pays):")
    for name, label in (("on", "everything on"), ("sampled", "on, 10% traced")):
        total = cpu[name] + relay[name]
        print(f"    {label}: {total:.0f} µs, {1 - cpu['off'] / total:.1%} fewer requests/s")
    verdicts = []
    for key, against in (("on", "everything off"), ("on_against_logs", "issue 4's off")):
        low, _, high = fewer[key]
        if result["rounds"] < 2:
            verdict = "one round: no interval"
        else:
            verdict = "met" if high <= 0.10 else "not met" if low > 0.10 else "not resolved"
        verdicts.append(f"against {against} {shown(fewer[key])}, {verdict}")
    print("target: <= 10% fewer requests/s: " + "; ".join(verdicts))


def _rounds(text: str) -> int:
    rounds = int(text)
    if rounds < 1:
        raise argparse.ArgumentTypeError("at least one round")
    return rounds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rounds",
        type=_rounds,
        default=6,
        help="paired rounds, each of fresh servers (default 6, ~10 min on 2 cores; "
        "docs/BENCHMARKS.md's session 18 figure rests on 48)",
    )
    report(measure(parser.parse_args().rounds))

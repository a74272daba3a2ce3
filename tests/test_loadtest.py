"""The load-test harness against the real native stack: what it reports must be what the
servers saw, request for request, each request's time within what nginx measured."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from deployment.topology import Topology
from loadtest import oom
from loadtest import report as reports
from loadtest.hdr import Aggregate, Recorder, encode, histogram, summarize
from tests.servers import route_count, wait_until


def _loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _run_in(tmp_path: Path, topology: Topology, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "reports"
    run = _loadtest("run", "--target", topology.url, "--out", str(out), *args)
    report = json.loads((out / "latest" / "report.json").read_text())
    return run.returncode, report, run.stdout + run.stderr


def _percentile(values: list[float], p: float) -> float:
    """hdrhistogram's convention: the value at rank round(p% of n), at least 1. With the
    few dozen requests of a test run, rounding instead of ceiling is the difference
    between the largest and the second largest request at p99."""
    ordered = sorted(values)
    rank = max(1, int(p * len(ordered) / 100 + 0.5))
    return ordered[rank - 1]


def test_a_run_reports_exactly_what_the_servers_saw(topology: Topology, tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("total: {p99_ms: 60000, error_rate: 0.01}\n")
    before = sum(route_count(topology, "/documents").values())
    code, report, output = _run_in(
        tmp_path, topology, "--scenario", "ingest", "--users", "3", "--duration", "10s",
        "--processes", "2", "--slo", str(slo), "--samples",
    )  # fmt: skip
    assert code == 0, output[-4000:]
    served = sum(route_count(topology, "/documents").values()) - before
    latest = tmp_path / "reports" / "latest"
    for name in ("report.csv", "index.html", "latency_over_time.png", "percentiles.png"):
        assert (latest / name).stat().st_size > 0
    assert report["locust_workers"] == 2  # histograms merged from two processes
    entry = report["endpoints"]["POST /documents"]
    total = report["total"]
    assert total["requests"] == entry["requests"] > 20
    assert abs(total["requests"] - served) <= 0.01 * served
    assert entry["samples"] == entry["requests"]  # every request in the HDR histogram
    assert set(report) >= {"total", "endpoints"}
    assert set(total) >= {"requests", "failures", "rps", "p50", "p90", "p95", "p99", "p999", "max"}

    # Every request as the client timed it (--samples), and as nginx saw it, by request id.
    client = {
        row["request_id"]: float(row["ms"])
        for path in (latest / "samples").glob("samples-*.csv")
        for row in csv.DictReader(path.open())
    }
    assert len(client) == entry["requests"]
    times = list(client.values())
    for key, p in (("p50", 50), ("p90", 90), ("p99", 99)):
        # The report's percentiles are the samples' (HDR keeps 3 significant digits).
        assert abs(entry[key] - _percentile(times, p)) <= 0.001 * _percentile(times, p) + 0.01
    prefix = f"lt-{report['run_id']}-ingest-"
    logged = (topology.log_dir / "nginx-access.log").read_text().splitlines()
    edge = {
        line["request_id"]: float(line["request_time"]) * 1000
        for line in map(json.loads, logged)
        if line["request_id"].startswith(prefix)
    }
    assert edge.keys() == client.keys()
    # nginx's time lies inside the client's (it starts after the send and ends before the
    # answer arrives); both clocks have millisecond steps. A late-scheduled client can add
    # to one request, not to all: the typical gap is small.
    assert all(client[rid] >= edge[rid] - 2.0 for rid in client)
    assert statistics.median(client[rid] - edge[rid] for rid in client) < 10.0


def test_a_multi_process_run_counts_the_answers_still_running_at_its_end(
    topology: Topology, tmp_path: Path
) -> None:
    """LLM answers take seconds, so some are running when the run's time is up. Locust's
    master used to quit before its workers had reported them (locustio/locust#1426)."""
    code, report, output = _run_in(
        tmp_path, topology, "--scenario", "cache-miss", "--users", "2", "--processes", "2",
        "--duration", "6s",
    )  # fmt: skip
    assert code == 0, output[-4000:]
    prefix = f"lt-{report['run_id']}-"
    seen = [
        line
        for line in (topology.log_dir / "nginx-access.log").read_text().splitlines()
        if prefix in line
    ]
    assert report["total"]["requests"] == len(seen) > 0, output[-2000:]
    assert report["total"]["failures"] == 0


def test_an_slo_breach_fails_the_run_and_still_writes_the_report(
    topology: Topology, tmp_path: Path
) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text('total: {p50_ms: 0.001}\n"POST /documents": {error_rate: 0.5}\n')
    code, report, output = _run_in(
        tmp_path, topology, "--scenario", "ingest", "--users", "1", "--duration", "2s",
        "--slo", str(slo),
    )  # fmt: skip
    assert code == 1
    listed = [line.strip() for line in output.split("SLO breached:\n", 1)[1].splitlines()]
    assert len(listed) == 1 and listed[0].startswith("total: p50")  # the error rate held
    assert report["slo_breaches"] == listed


def test_bad_input_is_a_clear_error_before_any_load(tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("total: {p95: 500}\n")
    run = _loadtest("run", "--slo", str(slo), "--target", "http://127.0.0.1:9")
    assert run.returncode == 2 and "unknown limit 'p95'" in run.stderr
    run = _loadtest("run", "--duration", "ten", "--target", "http://127.0.0.1:9")
    assert run.returncode == 2 and "duration" in run.stderr
    run = _loadtest("run", "--target", "http://127.0.0.1:9", "--out", str(tmp_path))
    assert run.returncode == 1 and "does not answer" in run.stderr
    run = _loadtest("run", "--duration", "0m0s", "--target", "http://127.0.0.1:9")
    assert run.returncode == 2 and "at least 1s" in run.stderr  # Locust: zero is forever
    run = _loadtest(
        "run", "--arrival-rate", "50", "--users", "1", "--processes", "2",
        "--target", "http://127.0.0.1:9",
    )  # fmt: skip
    assert run.returncode == 2 and "--users >= --processes" in run.stderr
    slo.write_text("total: {min_rps: 10}\n")
    run = _loadtest(
        "run", "--shape", "breakpoint", "--slo", str(slo), "--target", "http://127.0.0.1:9"
    )  # fmt: skip
    assert run.returncode == 2 and "latency or error_rate" in run.stderr
    run = _loadtest("compare", str(slo), str(slo), "--threshold", "nan")
    assert run.returncode == 2 and "fraction" in run.stderr
    for args in (
        ["--limit", "-1"],
        ["--workers", "0"],
        ["--stages", "0"],
        ["--stage-seconds", "-1"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "loadtest.oom", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert run.returncode == 2 and args[0] in run.stderr, (args, run.stderr)
    assert list(tmp_path.iterdir()) == [slo]


def _report(rps: float, p99: float, failures: int = 0, requests: int = 100) -> dict[str, object]:
    figures = {
        "requests": requests,
        "failures": failures,
        "rps": rps,
        "p50": 10.0,
        "p90": 20.0,
        "p95": 30.0,
        "p99": p99,
        "p999": p99,
        "max": p99,
    }
    return {"endpoints": {"POST /query [hit]": figures}, "total": figures}


def test_compare_flags_regressions_beyond_the_threshold(tmp_path: Path) -> None:
    table, regressed = reports.compare(_report(100, 50), _report(95, 54), threshold=0.10)
    assert not regressed and "WORSE" not in table
    table, regressed = reports.compare(_report(100, 50), _report(100, 80), threshold=0.10)
    assert regressed and "p99" in next(line for line in table.splitlines() if "WORSE" in line)
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_report(100, 50)))
    new.write_text(json.dumps(_report(70, 50, failures=3)))
    run = _loadtest("compare", str(old), str(new))
    assert run.returncode == 1
    worse = {line.split()[-5] for line in run.stdout.splitlines() if line.endswith("WORSE")}
    assert worse == {"rps", "error_rate"}


def test_compare_shows_entries_only_one_run_has() -> None:
    old, new = _report(100, 50), _report(100, 50)
    new["endpoints"] = {"POST /documents": new["total"]}
    table, regressed = reports.compare(old, new, 0.10)
    only = {line.split("  ")[0]: line.split()[-2] for line in table.splitlines() if "only" in line}
    assert only == {"POST /query [hit]": "old", "POST /documents": "new"}
    assert not regressed  # totals equal; a different mix is shown, not judged


def test_compare_judges_failure_rates_not_counts() -> None:
    # 2 in 100, then 3 in 1000: more failures, but a tenth of the rate.
    _, regressed = reports.compare(_report(100, 50, 2), _report(100, 50, 3, 1000), 0.10)
    assert not regressed
    _, regressed = reports.compare(_report(100, 50, 2), _report(100, 50, 4), 0.10)
    assert regressed


def test_failures_are_counted_but_their_latency_is_not() -> None:
    """A dead target refuses in a millisecond: those times must not make p95 look good."""
    recorder = Recorder()
    for _ in range(50):
        recorder.record("POST /query", "POST", 1.0, failed=True)
    payload = recorder.take()
    aggregate = Aggregate()
    aggregate.add(payload)
    figures = summarize(aggregate.totals["POST /query"], 50, payload["failures"]["POST /query"], 5)
    assert figures["failures"] == 50 and figures["samples"] == 0 and figures["p95"] is None
    report = {"total": figures, "endpoints": {}}
    assert reports.breaches(report, {"total": {"p95_ms": 500}}) == [
        "total: p95: no request succeeded"
    ]
    aggregate.check_breakpoint({"p99_ms": 50}, users=4)  # and a ramp stops there
    assert aggregate.breakpoint is not None
    assert aggregate.breakpoint["breaches"] == ["p99_ms (none succeeded) > 50"]


def test_the_shipped_example_slo_is_valid() -> None:
    example = Path(reports.__file__).parent / "slo.example.yaml"
    assert reports.load_slo(example)["total"] == {"p95_ms": 500, "p99_ms": 1500, "error_rate": 0.01}


def test_the_oom_finder_finds_the_kill_and_the_replica_recovers(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.oom",
            "--limit",
            "640M",
            "--workers",
            "2",
            "--stage-seconds",
            "5",
            "--stages",
            "8",
            "--until-kill",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    latest = tmp_path / "oom-latest"
    result = json.loads((latest / "oom.json").read_text())
    assert result["outcome"] == "oom kill"
    assert result["oom_kills"] >= 1  # the cgroup's own counter
    assert result["gunicorn_kill_lines"] >= 1  # "was sent SIGKILL! Perhaps out of memory?"
    assert result["recovered"] is True  # gunicorn replaced the worker; /ready is 200 again
    breaking = result["breaking_stage"]
    assert breaking["number"] > 1 and breaking["peak_group_bytes"] <= result["limit_bytes"]
    assert result["baseline_bytes"] < result["recommended_limit_bytes"]
    assert result["peak_worker_rss_bytes"] > 100 * 1024 * 1024
    assert (latest / "index.html").stat().st_size and (latest / "memory.png").stat().st_size
    # The cgroup is gone afterwards.
    assert not list(Path("/sys/fs/cgroup/memory").rglob("rag-oom-*"))


def test_the_open_model_keeps_its_schedule_and_charges_the_queue(
    topology: Topology, tmp_path: Path
) -> None:
    code, report, output = _run_in(
        tmp_path, topology, "--scenario", "cache-hit", "--arrival-rate", "40", "--users", "4",
        "--duration", "5s",
    )  # fmt: skip
    assert code == 0, output[-2000:]
    sent = report["generator"]["sent"]
    assert report["model"] == "open" and report["total"]["requests"] == sent
    # 40/s for the run's window (5 s, or a little more if a busy machine stopped it late).
    assert abs(sent - 40 * report["duration_s"]) <= 10
    assert report["generator"]["dropped"] == 0
    # Overload: 2 senders cannot keep 10000/s (a Python sender manages a few thousand a
    # second against cached answers). Sends fall behind, the hopeless ones are dropped,
    # and latency counts from the scheduled time, queue included.
    code, report, output = _run_in(
        tmp_path / "over", topology, "--scenario", "cache-hit", "--arrival-rate", "10000",
        "--users", "2", "--duration", "4s", "--max-late", "0.2",
    )  # fmt: skip
    assert code == 0, output[-2000:]
    generator = report["generator"]
    assert generator["dropped"] > 0 and generator["late"] > 0.5 * generator["sent"]
    assert report["total"]["p50"] > 100  # a cached answer takes ~5 ms; the rest is queue
    assert "dropped" in output


def test_the_step_shape_adds_users_in_steps(topology: Topology, tmp_path: Path) -> None:
    code, _, output = _run_in(
        tmp_path, topology, "--scenario", "cache-hit", "--shape", "step", "--users", "5",
        "--duration", "15s",  # 3 s steps: only a 2 s stall of the history hides one
    )  # fmt: skip
    assert code == 0, output[-2000:]
    history = (tmp_path / "reports" / "latest" / "locust_stats_history.csv").read_text()
    counts = [int(line.split(",")[1]) for line in history.splitlines()[1:] if line]
    steps = [c for i, c in enumerate(counts) if c and (i == 0 or c != counts[i - 1])]
    assert steps == [1, 2, 3, 4, 5], counts


def test_the_breakpoint_shape_stops_when_the_slo_breaks(topology: Topology, tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("total: {p50_ms: 0.001}\n")  # broken as soon as it is judged
    code, report, output = _run_in(
        tmp_path, topology, "--scenario", "cache-hit", "--shape", "breakpoint", "--users", "20",
        "--duration", "60s", "--slo", str(slo),
    )  # fmt: skip
    assert code == 1
    assert report["breakpoint"]["breaches"][0].startswith("p50_ms")
    assert report["duration_s"] < 30  # stopped at the breach, not after the full ramp
    assert "breakpoint: the SLO broke" in output


def test_breakpoint_judgement_remembers_the_best_rate_before_the_breach() -> None:
    aggregate = Aggregate()
    now = time.time()

    def window(ms: float, count: int, at: float) -> None:
        hist = histogram()
        for _ in range(count):
            hist.record_value(int(ms * 1000))
        aggregate.add({"histograms": {"q": encode(hist)}, "kinds": {"q": "POST"}}, at=at)

    window(5, 300, now)  # 100 req/s at 5 ms: fine
    aggregate.check_breakpoint({"p99_ms": 50}, users=10)
    assert aggregate.breakpoint is None
    aggregate.intervals.clear()
    window(80, 450, now)  # 150 req/s at 80 ms: broken
    aggregate.check_breakpoint({"p99_ms": 50}, users=15)
    assert aggregate.breakpoint is not None
    (breach,) = aggregate.breakpoint.pop("breaches")
    assert breach.startswith("p99_ms 80.0") and breach.endswith("> 50")  # HDR: within 0.1%
    assert aggregate.breakpoint == {"users": 15, "max_sustainable_rps": 100.0, "users_at_max": 10}


def test_a_run_shows_up_live_in_the_stacks_prometheus(topology: Topology, tmp_path: Path) -> None:
    targets = topology.stack_dir / "prometheus" / "targets"
    run = subprocess.Popen(
        [
            sys.executable, "-m", "loadtest", "run", "--target", topology.url,
            "--scenario", "cache-hit", "--users", "2", "--duration", "25s",
            "--metrics-port", "0", "--prometheus-targets", str(targets),
            "--out", str(tmp_path / "reports"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip

    def sent() -> float:
        result = httpx.get(
            f"{topology.prometheus_url}/api/v1/query",
            params={"query": 'sum(loadtest_requests_total{job="loadtest"})'},
        ).json()["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    try:
        wait_until(lambda: sent() > 0, 40, "the load test's metrics in Prometheus")
        users = httpx.get(
            f"{topology.prometheus_url}/api/v1/query", params={"query": "loadtest_users"}
        ).json()["data"]["result"]
        assert [float(r["value"][1]) for r in users] == [2.0]
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-2000:]
    report = json.loads((tmp_path / "reports" / "latest" / "report.json").read_text())
    # While running it was announced; now the file says there is nothing to scrape.
    assert json.loads((targets / "loadtest.json").read_text()) == []
    assert report["metrics_port"] > 0
    assert sent() <= report["total"]["requests"]


def test_no_limit_is_recommended_when_no_stage_held():
    mib = 1024 * 1024
    assert oom.recommended_limit([]) is None  # not the idle figure, which knows no load
    assert oom.recommended_limit([300 * mib, 400 * mib]) == 576 * mib  # 400 * 1.3, up to 64 MiB


def _on_a_terminal() -> None:
    """In the child: a new session whose controlling terminal is its stdin (a pty), and
    Ctrl-C's signal at its default, as a terminal's shell starts a command. A test run
    started in the background by a shell (`cmd &`, a CI job) inherits SIGINT ignored, and
    Python installs its KeyboardInterrupt handler only over the default."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_run_gracefully_and_still_reports(
    topology: Topology, tmp_path: Path
) -> None:
    """Run from a terminal (a pty here) and stopped by a Ctrl-C typed into it: the harness
    asks Locust to stop and write what it measured, and reports the run so far, exit 130.
    On a terminal, Locust in its own process group must not touch the terminal either
    (its key listener would be stopped by SIGTTOU and the run would hang)."""
    targets = tmp_path / "targets"
    targets.mkdir()
    controller, terminal = os.openpty()
    run = subprocess.Popen(
        [
            sys.executable, "-m", "loadtest", "run", "--target", topology.url,
            "--scenario", "cache-hit", "--users", "2", "--duration", "120s",
            "--metrics-port", "0", "--prometheus-targets", str(targets),
            "--out", str(tmp_path / "reports"),
        ],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        preexec_fn=_on_a_terminal,  # noqa: PLW1509  # the test runs no threads of its own here
    )  # fmt: skip
    os.close(terminal)
    output = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once every writer has gone
            while chunk := os.read(controller, 65536):
                output.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: json.loads((targets / "loadtest.json").read_text()) != [], 60, "running")
        time.sleep(3)  # some requests
        os.write(controller, b"\x03")  # Ctrl-C: the terminal signals its foreground group
        assert run.wait(timeout=120) == 130, output.decode(errors="replace")[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        reader.join(timeout=10)
        os.close(controller)
    report = json.loads((tmp_path / "reports" / "latest" / "report.json").read_text())
    assert report["interrupted"] is True and report["total"]["requests"] > 0
    assert report["duration_s"] < 60
    assert json.loads((targets / "loadtest.json").read_text()) == []  # withdrawn


def test_the_open_model_paces_uploads_in_the_mixed_scenario() -> None:
    """Each upload retires the answer cache: the open model draws one per 10 s per
    process, as the closed model's upload users pace themselves, not a tenth of the rate."""
    code = (
        "from loadtest import locustfile as lf\n"
        "draws = [lf._draw() for _ in range(2000)]\n"
        "print(sum(d is lf.ingest for d in draws), sum(d is lf.ask_popular for d in draws))\n"
    )
    env = {
        **os.environ,
        "LOADTEST_SCENARIO": "mixed",
        "LOADTEST_ARRIVAL_RATE": "100",
        "LOADTEST_INGEST_EVERY": "10",
    }
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
        check=True,
    )  # fmt: skip
    uploads, popular = map(int, run.stdout.split()[-2:])
    assert uploads == 1
    assert popular > 1000  # the other draws follow the queries' weights (6 of 9 popular)
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**env, "LOADTEST_INGEST_EVERY": "0", "LOADTEST_SCENARIO": "ingest"}, check=True,
    )  # fmt: skip
    assert run.stdout.split()[-2:] == ["2000", "0"]  # alone, uploads run flat out

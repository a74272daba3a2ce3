"""`make loadtest`: a headless Locust run that writes an honest latency report.

    python -m loadtest run [--target URL] [--users N] [--duration 60s] [--scenario mixed]
                           [--slo slo.yaml] [--processes N] [--out loadtest/reports]
    python -m loadtest compare OLD/report.json NEW/report.json [--threshold 0.1]

A run writes loadtest/reports/<UTC time>/ (report.json, report.csv, index.html and its
plots, Locust's own CSVs) and points loadtest/reports/latest at it. It exits 1 when an SLO
is breached or Locust could not run, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from api import processes
from loadtest import arguments
from loadtest import report as reports
from loadtest.questions import POPULAR
from loadtest.scenarios import SCENARIOS

HERE = Path(__file__).resolve().parent
DEFAULT_TARGET = f"http://127.0.0.1:{os.environ.get('NGINX_PORT', '8080')}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="a headless run and its report")
    run.add_argument("--target", default=DEFAULT_TARGET, help="base URL (default: the stack)")
    run.add_argument("--users", type=arguments.positive_int, default=20)
    run.add_argument(
        "--spawn-rate", type=float, default=None, help="users/s (default: all at once)"
    )
    run.add_argument("--duration", type=arguments.duration, default="60s")
    run.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    run.add_argument("--slo", type=Path, default=None, help="YAML limits; a breach exits 1")
    run.add_argument(
        "--processes",
        type=arguments.positive_int,
        default=1,
        help="Locust worker processes (HDR merged)",
    )
    run.add_argument("--out", type=Path, default=HERE / "reports")
    run.add_argument(
        "--samples",
        action="store_true",
        help="also write every request's id, entry, time and outcome (samples/*.csv)",
    )
    run.add_argument(
        "--arrival-rate",
        type=float,
        default=0.0,
        help="open model: requests/s on a fixed schedule (USERS is then the sender pool)",
    )
    run.add_argument(
        "--max-late", type=float, default=1.0, help="open model: drop a send this many s late"
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=9646,
        help="the harness's live metrics for Prometheus (0: any free port)",
    )
    run.add_argument(
        "--prometheus-targets",
        type=Path,
        default=Path(os.environ.get("STACK_DIR", HERE.parent / "var")) / "prometheus" / "targets",
        help="file_sd directory of the stack's Prometheus, told about this run (if it exists)",
    )
    run.add_argument(
        "--shape",
        choices=["step", "spike", "soak", "breakpoint"],
        default=None,
        help="users over time; breakpoint ramps until the SLO's `total` limits break",
    )
    compare = commands.add_parser("compare", help="two reports side by side")
    compare.add_argument("old", type=Path)
    compare.add_argument("new", type=Path)
    compare.add_argument("--threshold", type=arguments.fraction, default=0.10)
    return parser


def _warm(target: str) -> None:
    """The popular questions once each, so the cache-hit entry measures hits."""
    with httpx.Client(base_url=target, timeout=300) as client:
        for question in POPULAR:
            client.post("/query", json={"question": question}).raise_for_status()


def run(args: argparse.Namespace) -> int:
    slo = reports.load_slo(args.slo) if args.slo else None
    # min_rps is not judged on a ramp: its early, light seconds would always break it.
    if args.shape == "breakpoint" and not set((slo or {}).get("total", {})) - {"min_rps"}:
        raise ValueError(
            "--shape breakpoint needs --slo with `total` latency or error_rate limits to break"
        )
    if args.shape and args.arrival_rate:
        raise ValueError("--shape shapes users; with --arrival-rate the rate is the shape")
    if args.arrival_rate < 0:
        raise ValueError("--arrival-rate must be positive")
    if args.arrival_rate and args.users < args.processes:
        # Each process sends its share of the rate with its own senders; Locust would
        # give some processes none, and their share would silently go unsent.
        raise ValueError("--arrival-rate needs --users >= --processes (each process's senders)")
    try:
        health = httpx.get(f"{args.target}/health", timeout=5)
    except httpx.HTTPError as exc:
        print(
            f"loadtest: {args.target} does not answer ({exc}); is `make stack` up?", file=sys.stderr
        )
        return 1
    if health.status_code != 200:
        print(f"loadtest: {args.target}/health answered {health.status_code}", file=sys.stderr)
        return 1
    if args.scenario in ("cache-hit", "mixed"):
        try:
            _warm(args.target)
        except httpx.HTTPError as exc:
            print(f"loadtest: warming the cache failed: {exc}", file=sys.stderr)
            return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    directory = args.out / stamp
    directory.mkdir(parents=True, exist_ok=True)
    raw_path = directory / "raw.json"
    samples = directory / "samples"
    if args.samples:
        samples.mkdir()
    run_id = uuid.uuid4().hex[:8]
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "--only-summary",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate or args.users),
        "-t",
        args.duration,
        "-H",
        args.target,
        "--csv",
        str(directory / "locust"),
        "--exit-code-on-error",
        "0",  # failures are judged by the SLO, not by Locust
        "--stop-timeout",
        "30",
        *(["--processes", str(args.processes)] if args.processes > 1 else []),
        *(["OpenModelUser"] if args.arrival_rate else SCENARIOS[args.scenario]),
    ]
    env = {
        **os.environ,
        "LOADTEST_RUN_ID": run_id,
        "LOADTEST_RAW": str(raw_path),
        "LOADTEST_SAMPLES": str(samples) if args.samples else "",
        "LOADTEST_INGEST_EVERY": "10" if args.scenario == "mixed" else "0",
        "LOADTEST_SCENARIO": args.scenario,
        "LOADTEST_ARRIVAL_RATE": str(args.arrival_rate / args.processes),
        "LOADTEST_MAX_LATE": str(args.max_late),
        "LOADTEST_SHAPE": args.shape or "",
        "LOADTEST_USERS": str(args.users),
        "LOADTEST_SECONDS": str(arguments.duration_seconds(args.duration)),
        "LOADTEST_SPAWN_RATE": str(args.spawn_rate or args.users),
        "LOADTEST_BREAKPOINT_SLO": json.dumps((slo or {}).get("total", {})),
        "LOADTEST_METRICS_PORT": str(args.metrics_port),
        "LOADTEST_TARGETS_DIR": str(args.prometheus_targets),
    }
    code, interrupted = _run_locust(command, env)
    if not raw_path.exists():
        print(f"loadtest: locust exited {code} without results", file=sys.stderr)
        return 1
    raw = json.loads(raw_path.read_text())
    result = reports.build(
        raw,
        {
            "target": args.target,
            "scenario": args.scenario,
            "users": args.users,
            "processes": args.processes,
            "slo": str(args.slo) if args.slo else None,
            "model": "open" if args.arrival_rate else "closed",
            "arrival_rate": args.arrival_rate or None,
            "shape": args.shape,
            "interrupted": interrupted,
        },
    )
    found = reports.breaches(result, slo) if slo else []
    result["slo_breaches"] = found
    reports.write(result, raw, directory)
    latest = args.out / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(stamp)
    _print(result, directory)
    if interrupted:
        print("loadtest: interrupted; the report covers the run until then", file=sys.stderr)
        return 130
    if code != 0:  # the figures were written; what went wrong is in Locust's output above
        print(f"loadtest: locust exited {code}; the report is written", file=sys.stderr)
        return 1
    if found:
        print("SLO breached:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    return 0


STOP_GRACE_S = 60  # Locust's --stop-timeout (30 s) for its users, and time to write


def _run_locust(command: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Locust's exit code, and whether the run was interrupted. Locust runs in a process
    group of its own, so a Ctrl-C reaches this process only, which then asks Locust to
    stop (SIGTERM: it stops its users and writes what it measured) and waits for it; the
    kernel stops Locust if this process is killed outright."""
    # Not the terminal either: Locust's key listener would put it in cbreak mode, which
    # from a background process group stops it (SIGTTOU).
    locust = processes.start_supervised(command, env, cwd=str(HERE.parent))
    try:
        return locust.wait(), False
    except KeyboardInterrupt:
        locust.terminate()
        try:
            return locust.wait(STOP_GRACE_S), True
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: now
            locust.kill()
            return locust.wait(), True


def _ms(value: float | None) -> str:
    return f"{value:8.1f}" if value is not None else f"{'-':>8}"


def _print(result: dict[str, Any], directory: Path) -> None:
    rows = [*result["endpoints"].items(), ("total", result["total"])]
    header = ["reqs", "fail", "rps", "p50", "p95", "p99", "max"]
    print(f"\n{'entry':36} {header[0]:>7} {header[1]:>5}", *(f"{h:>8}" for h in header[2:]))
    for name, f in rows:
        print(
            f"{name:36} {f['requests']:7d} {f['failures']:5d} {f['rps']:8.1f} "
            f"{_ms(f['p50'])} {_ms(f['p95'])} {_ms(f['p99'])} {_ms(f['max'])}"
        )
    print(f"(milliseconds; report in {directory})")
    generator = result["generator"]
    if result["model"] == "open":
        print(
            f"open model at {result['arrival_rate']}/s: {generator['sent']} sent, "
            f"{generator['late']} late (> 10 ms), {generator['dropped']} dropped, "
            f"at most {generator['max_late_s'] * 1000:.0f} ms behind schedule"
        )
    if generator["saturated"]:
        print(
            f"warning: a Locust process used {generator['busiest_process_cpu']:.0%} of a core: "
            "the figures measure the load generator too; raise --processes",
            file=sys.stderr,
        )
    if result.get("shape") == "breakpoint" and not result.get("breakpoint"):
        print("breakpoint: the SLO held through the whole ramp; raise USERS or DURATION")
    if breakpoint := result.get("breakpoint"):
        print(
            f"breakpoint: the SLO broke at {breakpoint['users']} users "
            f"({'; '.join(breakpoint['breaches'])}); highest sustained rate "
            f"{breakpoint['max_sustainable_rps']} req/s at {breakpoint['users_at_max']} users"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
        table, regressed = reports.compare(old, new, args.threshold)
        print(table)
        return 1 if regressed else 0
    except (ValueError, OSError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

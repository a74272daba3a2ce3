"""`make stack` / `make stack-down`: the production topology as native processes.

supervisord (from the `supervisor` package) runs every server: it restarts whatever exits,
stops a program's whole process group, and keeps one log per program under
STACK_DIR/log. It was chosen over honcho, which stops everything when one process exits
(the opposite of what a crashed replica needs), and over circus, which is less used and
less documented. This module only renders the configuration (deployment/topology.py),
starts supervisord, waits until every part answers, and loads the sample corpus.

    python -m deployment.stack up | down | status
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from deployment.topology import (
    HOST,
    MEMBER_ENV,
    STOP_WAIT_SECONDS,
    Topology,
    member_signal,
    render,
    stack_dir_from_env,
)

BINARIES = (
    "redis-server",
    "nginx",
    "prometheus",
    "prometheus-nginx-exporter",
    "prometheus-redis-exporter",
)


class StackError(RuntimeError):
    pass


def _supervisord_pid(topology: Topology) -> int | None:
    """The pid of this stack's supervisord, if it runs: a stale pid file whose number now
    belongs to another process must not be signalled."""
    try:
        pid = int((topology.run_dir / "supervisord.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if b"supervisord" not in cmdline or str(_conf(topology)).encode() not in cmdline:
        return None
    return pid


def supervisorctl(topology: Topology, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(_conf(topology)), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout


def _conf(topology: Topology) -> Path:
    return topology.stack_dir / "supervisord.conf"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _preflight(topology: Topology) -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise StackError(f"not installed: {', '.join(missing)} (run `make system-deps`)")
    if _supervisord_pid(topology) is not None:
        raise StackError(f"a stack is already running from {topology.stack_dir}; stop it first")
    if _members(topology):
        raise StackError(
            f"processes of the stack in {topology.stack_dir} still run, but its supervisord "
            "does not: `make stack-down` stops them"
        )
    busy = [f"{name} ({port})" for name, port in topology.ports().items() if not _port_free(port)]
    if busy:
        raise StackError(
            "ports already in use: " + ", ".join(busy) + " (override them by env, see README)"
        )


def _checks(topology: Topology) -> dict[str, Callable[[], bool]]:
    def http(url: str) -> Callable[[], bool]:
        return lambda: httpx.get(url, timeout=2).status_code == 200

    def redis_up() -> bool:
        client = redis.Redis.from_url(topology.redis_url(), socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    checks: dict[str, Callable[[], bool]] = {
        "redis": redis_up,
        "chroma": http(f"http://{HOST}:{topology.chroma_port}/api/v2/heartbeat"),
        "llm": http(f"http://{HOST}:{topology.llm_port}/v1/models"),
    }
    for index, name in enumerate(topology.replica_names(), start=1):
        checks[name] = http(f"http://{HOST}:{topology.replica_port(index)}/ready")
    checks["nginx"] = http(f"{topology.url}/health")
    checks["prometheus"] = http(f"{topology.prometheus_url}/-/ready")
    checks["nginx-exporter"] = http(f"http://{HOST}:{topology.nginx_exporter_port}/metrics")
    checks["redis-exporter"] = http(f"http://{HOST}:{topology.redis_exporter_port}/metrics")
    return checks


def wait_ready(topology: Topology, timeout: float) -> None:
    pending = _checks(topology)
    waiting: list[str] = []  # what the error names: still pending, or given up on
    replicas = set(topology.replica_names())
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + 5
    while pending and time.monotonic() < deadline:
        for name, check in list(pending.items()):
            if name == "nginx" and replicas & pending.keys():
                continue  # asked too early, nginx would mark the replicas down
            try:
                if check():
                    del pending[name]
            except (OSError, httpx.HTTPError, redis.RedisError):
                pass
        if time.monotonic() > next_status:
            # supervisord gives up on a program that keeps dying at start: so do we.
            next_status = time.monotonic() + 5
            status = supervisorctl(topology, "status")
            if "FATAL" in status:
                waiting = [line.split()[0] for line in status.splitlines() if "FATAL" in line]
                break
        time.sleep(0.5)
    waiting = waiting or list(pending)
    if waiting:
        details = []
        for name in waiting:
            log = topology.log_dir / f"{name}.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"
            details.append(f"--- {name} ({log}):\n{tail}")
        raise StackError(
            f"not ready after {timeout:.0f}s: {', '.join(waiting)}\n" + "\n".join(details)
        )


def _load_corpus(topology: Topology) -> None:
    response = httpx.post(f"{topology.url}/documents/reload", timeout=600)
    if response.status_code != 200:
        raise StackError(
            f"loading the sample corpus failed: {response.status_code} {response.text}"
        )


def check_nginx(topology: Topology) -> None:
    """`nginx -t` on the rendered configuration, with the stack's own prefix."""
    nginx_dir = topology.stack_dir / "nginx"
    result = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"nginx rejects its configuration:\n{result.stderr}")


def up(topology: Topology, timeout: float = 300) -> None:
    _preflight(topology)
    render(topology)
    check_nginx(topology)
    subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(_conf(topology))],
        env={**os.environ, MEMBER_ENV: str(topology.stack_dir)},  # its programs inherit it
        check=True,
        timeout=60,
    )
    try:
        wait_ready(topology, timeout)
        _load_corpus(topology)
    except BaseException:
        down(topology)
        raise


def down(topology: Topology, timeout: float | None = None) -> bool:
    """Stop supervisord and, through it, every program it runs; True if one was running.
    Programs stop one after another, each given STOP_WAIT_SECONDS: the default timeout
    is what that adds up to for the programs the running configuration holds."""
    pid = _supervisord_pid(topology)
    if pid is None:
        return _stop_orphans(topology, "supervisord is gone")
    if timeout is None:
        programs = _conf(topology).read_text().count("[program:")
        timeout = STOP_WAIT_SECONDS * programs + 10
    with contextlib.suppress(ProcessLookupError):  # it may have just exited
        os.kill(pid, signal.SIGTERM)  # it stops its programs (process groups), then exits
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _stop_orphans(topology, "supervisord left some running")
            # nginx's spilled bodies, wherever they are (outside STACK_DIR as root).
            shutil.rmtree(topology.nginx_temp_dir, ignore_errors=True)
            return True
        time.sleep(0.2)
    raise StackError(f"supervisord (pid {pid}) did not stop within {timeout:.0f}s")


def _members(topology: Topology) -> dict[int, signal.Signals]:
    """Every running process the stack started (topology.member_signal says which), with
    the signal that stops it gracefully."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if (graceful := member_signal(topology, environ, command)) is not None:
            found[int(entry.name)] = graceful
    return found


def _stop_orphans(topology: Topology, why: str) -> bool:
    """Processes the stack started that no supervisord stops: each one's process group
    (supervisord gives every program its own) gets its graceful signal, then, after
    STOP_WAIT_SECONDS, KILL. True if there were any."""
    orphans = _members(topology)
    if not orphans:
        return False
    print(f"stack: {why}; stopping the {len(orphans)} process(es) it had started")
    own_group = os.getpgrp()
    for kill in (False, True):
        for pid, graceful in orphans.items():
            with contextlib.suppress(ProcessLookupError):
                group = os.getpgid(pid)
                if group != own_group:  # never this command's own group
                    os.killpg(group, signal.SIGKILL if kill else graceful)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while (orphans := _members(topology)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not orphans:
            break
    shutil.rmtree(topology.nginx_temp_dir, ignore_errors=True)
    return True


def _print_urls(topology: Topology) -> None:
    replicas = ", ".join(
        f"http://{HOST}:{topology.replica_port(i)}" for i in range(1, topology.replicas + 1)
    )
    password = topology.stack_dir / "redis" / "password"
    print(f"""
The stack is up ({topology.replicas} replicas x {topology.workers} workers):
  API (nginx, least_conn)  {topology.url}
  Prometheus               {topology.prometheus_url}
  replicas                 {replicas}
  Redis                    {HOST}:{topology.redis_port} (password in {password})
  Chroma                   http://{HOST}:{topology.chroma_port}
  LLM (OpenAI-compatible)  http://{HOST}:{topology.llm_port}/v1
  logs                     {topology.log_dir}/
Stop it with `make stack-down`.""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployment.stack")
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    try:
        # Stopping and inspecting need only STACK_DIR: the running configuration holds
        # the rest, and a bad port in the shell must not keep a stack from stopping.
        if args.command == "up":
            topology = Topology.from_env()
            up(topology)
            _print_urls(topology)
            return 0
        topology = Topology(stack_dir=stack_dir_from_env(dict(os.environ)))
        if args.command == "down":
            print("stopped" if down(topology) else "no stack running")
        else:
            if _supervisord_pid(topology) is None:
                print("no stack running")
                return 1
            print(supervisorctl(topology, "status"), end="")
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

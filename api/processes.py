"""Child processes this service starts (gunicorn, the local LLM, the span relay, Locust),
and the environment they inherit."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import MutableMapping

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def service_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """What every process of the service runs with. onnxruntime (1.2x, on Linux too) posts
    usage telemetry to mobile.events.data.microsoft.com about 10 s after its first session,
    and on; this service talks to no host it was not configured for. An operator may still
    set ORT_DISABLE_TELEMETRY=0. And loopback goes around any proxy."""
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    loopback_without_proxy(env)


def loopback_without_proxy(env: MutableMapping[str, str]) -> None:
    """Exempt this host's loopback from any proxy set in the environment (HTTP_PROXY and
    kin), for this process and every child it starts. The local LLM, Chroma, the span
    relay's collector and the stack's health checks are all on 127.0.0.1, and a proxy
    cannot reach them: its loopback is its own. httpx, requests and urllib (chromadb's
    client, the LLM client, the OTLP exporter, Locust) send loopback calls to the proxy
    unless NO_PROXY names them, so it does. A NO_PROXY of "*" already exempts all."""
    if not any(env.get(name) or env.get(name.lower()) for name in _PROXIES):
        return
    for name in ("NO_PROXY", "no_proxy"):
        given = [host.strip() for host in env.get(name, "").split(",") if host.strip()]
        if "*" not in given:
            env[name] = ",".join([*given, *(h for h in LOOPBACK_HOSTS if h not in given)])


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, `timeout` seconds to exit (a server drains what it holds), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def die_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when `parent` dies (Linux). A gunicorn
    worker otherwise outlives a master killed with SIGKILL (the OOM killer, `kill -9`):
    it goes on serving on the inherited socket, and the master its supervisor starts again
    cannot bind the port. If `parent` is already gone, exit now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died between the fork and the prctl
        os._exit(1)


def start_supervised(
    command: list[str], env: dict[str, str], cwd: str | None = None
) -> subprocess.Popen[bytes]:
    """A child in a process group of its own, so a terminal's Ctrl-C reaches only this
    process, which then stops it its own way; not reading the terminal (from a background
    group a read would stop it); and stopped by the kernel if this process dies. The caller
    must have no threads: the death signal is set between fork and exec."""
    parent = os.getpid()
    return subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=lambda: die_with(parent),  # noqa: PLW1509  # see the docstring
    )

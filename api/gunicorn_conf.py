"""gunicorn settings, derived from the one Settings object."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from api import processes
from api.config import get_settings
from api.telemetry import traces
from api.telemetry.logs import gunicorn_logconfig
from api.telemetry.relay import SOCKET_ENV, Relay

_settings = get_settings()

if _settings.web_concurrency > 1 and _settings.embedded_store:
    sys.exit(
        f"WEB_CONCURRENCY={_settings.web_concurrency} needs a Chroma server: the embedded store "
        "is single-process (chroma-core/chroma#961). Set CHROMA_HOST/CHROMA_PORT or use one worker."
    )

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.web_concurrency
worker_class = "api.worker.Worker"
timeout = _settings.timeout_seconds
graceful_timeout = 30
keepalive = 5
# Heartbeat files on tmpfs: the root filesystem may be read-only, and a slow disk would
# make gunicorn think its workers hang.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# Each worker builds the app (model, tracer, exporters) after the fork: onnxruntime's
# thread pools and the span processor's sending thread do not survive a fork.
preload_app = False
accesslog = None  # the app writes its own access log, inside the request's trace
# gunicorn 25+ opens a control socket at one default path per user
# ($XDG_RUNTIME_DIR/gunicorn.ctl, else $HOME/.gunicorn/gunicorn.ctl):
# several replicas on a host would fight over it, and a read-only root cannot hold it.
# Nothing here uses `gunicornc`; signals (HUP, TTIN, TERM) do the same work.
control_socket_disable = True
loglevel = _settings.log_level
logconfig_dict = gunicorn_logconfig(_settings.log_level, _settings.log_format)


_relay: Relay | None = None


def on_starting(server: Any) -> None:
    """Samples from an earlier run would be added to this run's counters: start empty.
    Spans are exported by a relay process beside the workers (api/telemetry/relay.py),
    started before they fork so they inherit its address."""
    global _relay
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        Path(directory).mkdir(parents=True, exist_ok=True)
    if traces.exporting():
        try:
            _relay = Relay()
        except Exception as exc:  # tracing must not keep the replica from serving
            server.log.error(f"span relay did not start ({exc}): each worker exports its own spans")
            os.environ.pop(SOCKET_ENV, None)
            return
        os.environ[SOCKET_ENV] = _relay.path


def post_fork(server: Any, worker: Any) -> None:
    """A worker goes when its master does, however the master died."""
    processes.die_with(server.pid)


def on_exit(server: Any) -> None:
    """After the workers: their last spans have reached the relay, which sends them on."""
    if _relay is not None:
        _relay.stop()


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges (RSS, CPU, active requests) and exemplars must go."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from api.telemetry.metrics import forget_worker

        forget_worker(worker.pid)

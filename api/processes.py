"""Child processes this service starts (gunicorn, the local LLM, the span relay)."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, `timeout` seconds to exit (a server drains what it holds), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""gunicorn settings, derived from the one Settings object."""

from __future__ import annotations

import sys

from api.config import get_settings

_settings = get_settings()

if _settings.web_concurrency > 1 and _settings.embedded_store:
    sys.exit(
        f"WEB_CONCURRENCY={_settings.web_concurrency} needs a Chroma server: the embedded store "
        "is single-process (chroma-core/chroma#961). Set CHROMA_HOST/CHROMA_PORT or use one worker."
    )

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.web_concurrency
worker_class = "uvicorn_worker.UvicornWorker"
timeout = _settings.timeout_seconds
graceful_timeout = 30
keepalive = 5
# Each worker loads its own model after the fork: onnxruntime thread pools do not survive fork.
preload_app = False
accesslog = None
loglevel = _settings.log_level

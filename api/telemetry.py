"""Logging set-up (metrics and traces join it here as the service grows)."""

from __future__ import annotations

import logging
import sys

import structlog

_HANDLER = "rag-api"


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """structlog renders; stdlib logging (uvicorn, gunicorn, chromadb) goes through the same
    renderer so one process writes one format."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    # Replace our own handler on reconfiguration; leave others (pytest's capture) alone.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER] + [handler]
    root.setLevel(level.upper())
    # Chatty libraries stay at warning unless asked for debug.
    for name in ("chromadb", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))

"""structlog set-up: JSON in production, console in development, and every line inside a
request carries its request_id, trace_id and span_id."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

_HANDLER = "rag-api"


def add_trace_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def _shared() -> list[structlog.types.Processor]:
    return [
        structlog.contextvars.merge_contextvars,  # request_id, bound by the middleware
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_trace_context,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def formatter(fmt: str = "json") -> logging.Formatter:
    """A stdlib formatter rendering like structlog: used for our handler and gunicorn's."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """structlog renders; stdlib logging (uvicorn, gunicorn, chromadb) goes through the same
    renderer so one process writes one format."""
    structlog.configure(
        processors=[*_shared(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    # Replace our own handler on reconfiguration; leave others (pytest's capture) alone.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER] + [handler]
    root.setLevel(level.upper())
    # Our middleware writes the access log (inside the request's span); chatty libraries
    # stay at warning unless asked for debug.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("chromadb", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))


def gunicorn_logconfig(level: str, fmt: str) -> dict[str, Any]:
    """gunicorn's own lines (boot, worker exits) in the same format as the app's."""
    # The handler's name is ours, so the app's configure_logging replaces it in a worker
    # instead of adding a second one.
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structlog": {"()": formatter, "fmt": fmt}},
        "handlers": {
            _HANDLER: {
                "class": "logging.StreamHandler",
                "formatter": "structlog",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": [_HANDLER]},
        "loggers": {
            name: {"handlers": [_HANDLER], "level": level.upper(), "propagate": False}
            for name in ("gunicorn.error", "gunicorn.access")
        },
    }

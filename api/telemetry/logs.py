"""structlog set-up: JSON in production, console in development, and every line inside a
request carries its request_id, trace_id and span_id.

Our own lines take structlog's native path (rendered by orjson, written as bytes): the
stdlib route costs about 25 µs per line, which on the cached /query path is a few percent
of throughput (docs/BENCHMARKS.md). Library lines (gunicorn, uvicorn, chromadb) still come
through stdlib logging and get the same renderer, so one process writes one format.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog
from opentelemetry import trace

_HANDLER = "rag-api"
_WRITE_LOCK = threading.Lock()


def add_trace_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


_second: tuple[int, str] = (-1, "")  # the last whole second seen, and its ISO text


def add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """ISO 8601 UTC with microseconds, like structlog's TimeStamper(fmt="iso", utc=True)
    but formatting the date once a second: in a busy worker the datetime round trip cost
    ~7 µs of the ~25 µs an access line costs (docs/BENCHMARKS.md)."""
    global _second
    now, micro = divmod(round(time.time() * 1e6), 1_000_000)  # rounded as datetime does
    second, text = _second  # one read of the pair: another thread may replace it
    if now != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        _second = (now, text)
    event["timestamp"] = f"{text}.{micro:06d}Z"
    return event


def _shared() -> list[structlog.types.Processor]:
    return [
        structlog.contextvars.merge_contextvars,  # request_id, bound by the middleware
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        add_trace_context,
        add_timestamp,
    ]


def _orjson_text(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()


def _renderer(fmt: str, text: bool) -> structlog.types.Processor:
    if fmt == "json":
        return structlog.processors.JSONRenderer(
            serializer=_orjson_text if text else orjson.dumps, default=str
        )
    console = structlog.dev.ConsoleRenderer(colors=False)
    if text:
        return console
    return lambda logger, name, event: console(logger, name, event).encode()


class StderrLogger:
    """structlog's output end: one write per line to whatever `sys.stderr` is now. Looked
    up per line, not bound once, so loggers cached on first use keep working when the
    stream is replaced (pytest's capture does that between tests)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def msg(self, message: bytes) -> None:
        stream = sys.stderr.buffer
        with _WRITE_LOCK:
            stream.write(message + b"\n")
            stream.flush()

    debug = info = warning = warn = error = err = critical = exception = fatal = log = msg


def formatter(fmt: str = "json") -> logging.Formatter:
    """A stdlib formatter rendering like structlog: used for library lines and gunicorn's."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(fmt, text=True),
        ],
    )


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *_shared(),
            structlog.processors.format_exc_info,
            _renderer(fmt, text=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=StderrLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    # Replace our own handler on reconfiguration; leave others (pytest's capture) alone.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER] + [handler]
    root.setLevel(numeric)
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

"""structlog set-up: JSON in production, console in development, and every line inside a
request carries its request_id, trace_id and span_id.

Our own lines take structlog's native path (rendered by orjson, written as bytes): the
stdlib route costs about 25 µs per line, which on the cached /query path is a few percent
of throughput (docs/BENCHMARKS.md). Library lines (gunicorn, uvicorn, chromadb) still come
through stdlib logging and get the same renderer, so one process writes one format.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson
import structlog
from opentelemetry import trace

from api.telemetry import flusher
from api.telemetry.tallies import LineQueue

_HANDLER = "rag-api"


def add_trace_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def add_pid(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Which process wrote the line: under gunicorn, which worker served the request."""
    event["pid"] = _pid
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
        add_pid,
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


class _Lines:
    """Where our lines wait for the flusher (api/telemetry/flusher.py) when buffering is
    on: one write a tenth of a second instead of one per request. A warning or worse is
    written at once, after the lines before it. The queue is compiled
    (`tallies.LineQueue`): a line is added without a lock, which lets the access line
    skip one. Written under the lock, so lines from several threads keep their order.
    The lock is re-entrant: a write can set off a line of its own in the same thread
    (asyncio logs an unread Future's error when the garbage collector frees it, wherever
    that happens)."""

    MAX = 256  # lines held before a write regardless of the clock

    def __init__(self) -> None:
        self._pipe = _PipeLock()
        self.queue = LineQueue(self.MAX)
        self._lock = threading.RLock()
        self._failed = False
        if hasattr(os, "register_at_fork"):  # a child forked mid-write starts clean
            os.register_at_fork(after_in_child=self._after_fork)

    @property
    def buffered(self) -> bool:
        return self.queue.buffered

    @buffered.setter
    def buffered(self, on: bool) -> None:
        self.queue.buffered = on

    def _after_fork(self) -> None:
        self.queue.take()  # the parent's lines are the parent's to write
        self._lock = threading.RLock()
        self._pipe.after_fork()

    def add(self, line: bytes, urgent: bool) -> None:
        if self.queue.add(line, urgent):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def unbuffer(self) -> None:
        """At exit: what is waiting goes now, and whatever comes later goes at once."""
        with self._lock:
            self.buffered = False
            self._write()

    def _write(self) -> None:
        lines = self.queue.take()
        if not lines:
            return
        try:
            # Looked up per write, not bound once: loggers cached on first use keep
            # working when the stream is replaced (pytest's capture does that).
            stream = sys.stderr.buffer
            with self._pipe.held(stream):
                for chunk in _chunks(lines):
                    _write_all(stream, chunk)
        except (OSError, ValueError) as exc:  # a closed or broken stderr: lines are lost
            if not self._failed:  # and it is said once, where it can still be said
                self._failed = True
                with contextlib.suppress(OSError):
                    os.write(2, f"log lines lost: stderr failed: {exc!r}\n".encode())
        else:
            self._failed = False


class _PipeLock:
    """An exclusive flock on what stderr writes to, held for each write of lines.

    A replica's workers share one pipe to the supervisor, and only a write of up to
    PIPE_BUF bytes is never cut into by another's: a longer line (a traceback) could come
    out spliced with another worker's lines. The lock keeps every process that logs
    through here out of the others' writes. flock belongs to an open file description,
    and an inherited stderr shares its parent's, so each process opens the pipe (or
    terminal, or file) again for its own. Where that cannot be done (a socket, a stream
    with no descriptor) lines go unlocked, as they do when a holder keeps the lock past
    WAIT_S (a sibling stopped mid-write must not stall every worker's logging)."""

    WAIT_S = 1.0

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._key: tuple[int, int] | None = None
        self._fd = -1  # -1: none (not opened yet, or cannot be)
        self._depth = 0  # a write can log in the same thread (see _Lines): lock once

    def after_fork(self) -> None:
        """The parent's descriptor is closed, not kept: kept, it would hold the parent's
        lock for as long as this child lived if the parent died holding it (closing a
        copy never releases the parent's)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._forget()

    @contextlib.contextmanager
    def held(self, stream: Any) -> Iterator[None]:
        locked = self._depth == 0 and (fd := self._descriptor(stream)) >= 0 and self._take(fd)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _descriptor(self, stream: Any) -> int:
        try:
            target = stream.fileno()
            status = os.fstat(target)
        except (OSError, ValueError, AttributeError):
            return -1
        # By what it is, not by descriptor number: a log reopen dup2s a new file onto 2.
        key = (status.st_dev, status.st_ino)
        if key != self._key:
            if self._fd >= 0:
                os.close(self._fd)
            self._key, self._fd = key, -1
            # Non-blocking: opening a named pipe for writing may wait for a reader.
            flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
            with contextlib.suppress(OSError):  # a socket: remembered as none
                self._fd = os.open(f"/proc/self/fd/{target}", flags)
        return self._fd

    def _take(self, fd: int) -> bool:
        deadline = time.monotonic() + self.WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.0005)
            except OSError:
                return False


def _write_all(stream: Any, data: bytes) -> None:
    """A raw stream (PYTHONUNBUFFERED) may take part of a write; the rest follows."""
    view = memoryview(data)
    while view:
        written = stream.write(view)
        view = view[len(view) if written is None else written :]
    stream.flush()


def _chunks(lines: list[bytes]) -> Iterator[bytes]:
    """Whole lines, at most PIPE_BUF bytes to a write where they fit: such a write is
    never cut into by a writer that does not take the lock above (another program on
    the same pipe)."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > select.PIPE_BUF:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


class LinesHandler(logging.Handler):
    """Library lines (stdlib logging: gunicorn, uvicorn, chromadb) take the same way out
    as ours, so one process's lines keep their order, and a library's warning takes the
    waiting lines with it."""

    def createLock(self) -> None:  # logging's name
        """No lock of its own: LINES has one. With two, a thread in `handle` (holding this
        one) waiting for LINES, and a thread writing LINES out whose garbage collection
        logs (asyncio's unread Future errors), each wait for the other's for good."""
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "backslashreplace") + b"\n"
            LINES.add(line, urgent=record.levelno >= logging.WARNING)
        except Exception:  # logging's own rule: a failing handler must not raise
            self.handleError(record)

    def flush(self) -> None:  # logging.shutdown() flushes every handler at exit
        LINES.flush()


LINES = _Lines()
# At exit what waits is written, and later lines go at once. Registered after the
# flusher's own exit flush (imported above), so it runs before it: last in, first out.
atexit.register(LINES.unbuffer)


class StderrLogger:
    """structlog's output end: rendered lines (bytes) to stderr, through `LINES`."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def msg(self, message: bytes) -> None:
        LINES.add(message + b"\n", urgent=False)

    def urgent(self, message: bytes) -> None:
        LINES.add(message + b"\n", urgent=True)

    debug = info = log = msg
    warning = warn = error = err = critical = exception = fatal = urgent


_access = {"json": True, "on": True}


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


def configure_logging(level: str = "info", fmt: str = "json", buffered: bool = False) -> None:
    """`buffered`: info lines wait up to a flusher tick (the app in a worker); a
    command-line process writes each line at once."""
    numeric = logging.getLevelName(level.upper())
    _access.update(json=fmt == "json", on=numeric <= logging.INFO)
    LINES.flush()
    LINES.buffered = buffered
    if buffered:
        flusher.every(1, LINES.flush)
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
    handler = LinesHandler()
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
            _HANDLER: {"class": "api.telemetry.logs.LinesHandler", "formatter": "structlog"}
        },
        "root": {"level": level.upper(), "handlers": [_HANDLER]},
        "loggers": {
            name: {"handlers": [_HANDLER], "level": level.upper(), "propagate": False}
            for name in ("gunicorn.error", "gunicorn.access")
        },
    }

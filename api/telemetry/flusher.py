"""One background thread per worker that moves telemetry out of the request path.

A request only records: its log lines wait in memory, its metric increments add up in C
(api/telemetry/tallies.pyx). This thread writes them out every tenth of a second (log
lines to stderr, increments to prometheus_client's mmap files), and less often flushes
exemplars and samples the worker's RSS and CPU. In a busy worker a write per request was
the larger part of what logs and metrics cost (docs/BENCHMARKS.md).

What that costs: a log line or a count reaches its file up to `TICK` seconds late, and a
worker killed with SIGKILL loses at most that much. A warning or an error is written at
once, with everything before it. A worker that exits normally flushes all (`flush()` from
the app's shutdown, and at exit).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable

TICK = 0.1  # seconds between flushes

_tasks: list[tuple[int, Callable[[], None]]] = []  # (every how many ticks, what)
_lock = threading.Lock()
_running = threading.Lock()  # one flush at a time: the thread's, or a shutdown's
_started_in: int | None = None  # the pid whose thread runs: threads do not survive a fork


def _after_fork() -> None:
    """A child forked while the thread held a lock would wait on it forever."""
    global _lock, _running
    _lock, _running = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def every(ticks: int, task: Callable[[], None]) -> None:
    """Run `task` every `ticks` ticks, and once more by `flush()`."""
    with _lock:
        if all(t != task for _, t in _tasks):  # ==: bound methods are made anew each time
            _tasks.append((ticks, task))


def start() -> None:
    """Start this process's thread (once; again in a forked child)."""
    global _started_in
    with _lock:
        if _started_in == os.getpid():
            return
        _started_in = os.getpid()
    threading.Thread(target=_run, name="telemetry-flusher", daemon=True).start()


def flush() -> None:
    """Everything now: at shutdown, and in tests that read what was just recorded."""
    with _running:
        for _, task in list(_tasks):
            _safely(task)


def _run() -> None:
    tick = 0
    wake = threading.Event()  # never set: a sleep that is not a busy loop
    while True:
        wake.wait(TICK)
        tick += 1
        with _running:
            for ticks, task in list(_tasks):
                if tick % ticks == 0:
                    _safely(task)


_failing: set[str] = set()


def _safely(task: Callable[[], None]) -> None:
    """A task that fails (a full tmpfs, a closed stream) says so once, and is retried.
    Said straight to fd 2: the failing task may be the log writer itself."""
    name = getattr(task, "__qualname__", repr(task))
    try:
        task()
    except Exception as exc:  # the thread must outlive any one task
        if name not in _failing:
            _failing.add(name)
            with contextlib.suppress(OSError):
                os.write(2, f"telemetry flush failed: {name}: {exc!r}\n".encode())
    else:
        _failing.discard(name)


atexit.register(flush)

# cython: language_level=3
"""Metric increments on the request path, added up in C until the flusher writes them;
and the queue of log lines it writes too.

In multiprocess mode prometheus_client's value takes a lock, checks the pid and writes its
mmap file on every increment, behind a few Python calls of the metric's own; a cached
answer made five of them. Here an increment adds to a C double. The telemetry flusher
(api/telemetry/flusher.py) moves the sums into prometheus_client's values every tick,
and a scrape moves its own worker's first. So the files trail by at most a tick, and a
worker killed with SIGKILL loses that much.

Increments run under the GIL and call no Python code between reading a sum and
changing it, so the flusher, on another thread, needs no lock to take the sums.

`make install` (pip install -e .) builds it; after editing this file, run it again.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

import os

cdef list _all = []  # every Tally and Series of this process
cdef bint _on = True  # metrics recorded at all: the one switch (telemetry.enable_metrics)


def enable(bint on):
    """Metrics on or off, for the service code's counts and observations, `Counted`, and
    the request recorder."""
    global _on
    _on = on


cpdef bint enabled() noexcept:
    return _on


cdef class _Pending:
    """What the flusher writes: sums waiting for prometheus_client's values."""

    cdef void _write(self) except *:
        pass

    cdef void _forget(self) noexcept:
        pass


cdef class Tally(_Pending):
    """A counter's or gauge's value, with its increments added up here."""

    def __init__(self, value):
        self._value = value
        self._pending = 0.0
        _all.append(self)

    # _value: prometheus_client's value (a child's `_value`); _pending: the sum to add.

    cpdef void inc(self, double amount=1.0):
        self._pending += amount

    cpdef void dec(self, double amount=1.0):
        self._pending -= amount

    cdef void _write(self) except *:
        cdef double amount = self._pending
        if amount == 0.0:
            return
        self._pending = 0.0  # taken before the write, which may let another thread run
        try:
            self._value.inc(amount)
        except BaseException:
            self._pending += amount  # tried again at the next flush
            raise

    cdef void _forget(self) noexcept:
        self._pending = 0.0


cdef class Counted:
    """One labelled series of a counter, for a path that counts on every request: `inc`
    is a C call that adds to its Tally, where telemetry.count builds its labels and finds
    the series again each time (~0.8 µs a call, docs/BENCHMARKS.md, session 18). Made at
    import; `resolve` (which finds the Tally) runs at the first increment, so the series
    is made in the process that counts, and not at all while metrics are off."""

    def __init__(self, resolve):
        self._resolve = resolve
        self._tally = None

    cpdef void inc(self, double amount=1.0) except *:
        if amount < 0:  # as prometheus_client's Counter.inc, and count(), on or off
            raise ValueError(f"counters only go up; {amount} given")
        if not _on:
            return
        if self._tally is None:
            self._tally = self._resolve()
        self._tally._pending += amount


cdef class Series(_Pending):
    """One labelled series of a histogram: its observations added up here, and the
    newest exemplar of each bucket kept in `exemplars` (api/telemetry/metrics.py), keyed
    by (metric name, label pairs, bucket text)."""

    # _sum, _buckets: prometheus_client's values, the sum and one per bucket; _bounds and
    # _counts (pending), per bucket; _keys: each bucket's exemplar key.

    def __cinit__(self, histogram, dict labels, exemplars):
        bounds = histogram._upper_bounds  # the histogram's own edges, +Inf last
        self._n = len(bounds)
        self._bounds = <double *>PyMem_Malloc(self._n * sizeof(double))
        self._counts = <double *>PyMem_Malloc(self._n * sizeof(double))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(self._n):
            self._bounds[i] = bounds[i]
            self._counts[i] = 0.0

    def __init__(self, histogram, dict labels, exemplars):
        child = histogram.labels(**labels) if labels else histogram
        self._sum = child._sum
        self._buckets = list(child._buckets)
        self._pending_sum = 0.0
        series = (histogram._name, tuple(labels.items()))
        self._keys = [(*series, le(bound)) for bound in histogram._upper_bounds]
        self._exemplars = exemplars
        _all.append(self)

    def __dealloc__(self):
        PyMem_Free(self._bounds)
        PyMem_Free(self._counts)

    cpdef void observe(self, double value, object trace_id):
        """`trace_id`: the exemplar's, or None for none. The bucket is the first whose
        bound is not below the value, as prometheus_client's (a NaN counts in none)."""
        cdef Py_ssize_t i
        cdef timespec now
        self._pending_sum += value
        for i in range(self._n):
            if value <= self._bounds[i]:
                self._counts[i] += 1.0
                if trace_id is not None:
                    clock_gettime(CLOCK_REALTIME, &now)
                    self._exemplars.latest[self._keys[i]] = (
                        trace_id,
                        value,
                        now.tv_sec + now.tv_nsec * 1e-9,
                    )
                    self._exemplars.dirty = True
                return

    cdef void _write(self) except *:
        cdef double amount = self._pending_sum
        cdef double count
        if amount != 0.0:
            self._pending_sum = 0.0
            try:
                self._sum.inc(amount)
            except BaseException:
                self._pending_sum += amount
                raise
        for i in range(self._n):
            count = self._counts[i]
            if count != 0.0:
                self._counts[i] = 0.0
                try:
                    self._buckets[i].inc(count)
                except BaseException:
                    self._counts[i] += count
                    raise

    cdef void _forget(self) noexcept:
        self._pending_sum = 0.0
        for i in range(self._n):
            self._counts[i] = 0.0


cdef class LineQueue:
    """Log lines waiting to be written (api/telemetry/logs.py holds the one queue and
    writes it). `add` and `take` run under the GIL and call no Python code between
    reading the list and changing it, so a line added on any thread is never lost
    between a take and the list that replaces it, and the request path adds its line
    without a lock. Writing, which must keep lines in order across threads, is the
    caller's, under its own lock."""

    def __cinit__(self, Py_ssize_t max):
        self._lines = []
        self.buffered = False
        self.max = max

    cpdef bint add(self, bytes line, bint urgent):
        """Queued; True if the queue should be written now (unbuffered, urgent, or full)."""
        if line is None:  # it would break the write of every line queued with it
            raise TypeError("a log line is bytes, not None")
        self._lines.append(line)
        return not self.buffered or urgent or len(self._lines) >= self.max

    cpdef list take(self):
        """Every line queued, in order; the queue left empty."""
        cdef list fresh = []  # made first: making it may run the garbage collector,
        lines = self._lines  # which may log, and so take the queue in between
        self._lines = fresh
        return lines


def le(bound):
    """A bucket's bound as the exposition writes it."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def flush():
    """Every sum into prometheus_client's values. One that cannot be written (a full
    tmpfs) keeps its amount for the next flush; the first such error is raised after the
    others are written."""
    cdef _Pending pending
    failed = None
    for pending in list(_all):
        try:
            pending._write()
        except Exception as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


def _forget_pending():
    """A forked child starts with nothing pending: its parent's sums are its parent's."""
    cdef _Pending pending
    for pending in _all:
        pending._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pending)

# cython: language_level=3
# What tallies.pyx declares for the other compiled modules (cimport): the request path
# calls these as C functions, not as Python methods.

cpdef bint enabled() noexcept  # metrics on (telemetry.enable_metrics)


cdef class _Pending:
    cdef void _write(self) except *
    cdef void _forget(self) noexcept


cdef class Tally(_Pending):
    cdef object _value
    cdef double _pending
    cpdef void inc(self, double amount=*)
    cpdef void dec(self, double amount=*)


cdef class Counted:
    cdef object _resolve
    cdef Tally _tally
    cpdef void inc(self, double amount=*) except *


cdef class Series(_Pending):
    cdef object _sum
    cdef list _buckets
    cdef Py_ssize_t _n
    cdef double *_bounds
    cdef double *_counts
    cdef double _pending_sum
    cdef list _keys
    cdef object _exemplars
    cpdef void observe(self, double value, object trace_id)


cdef class LineQueue:
    cdef list _lines
    cdef public bint buffered
    cdef readonly Py_ssize_t max
    cpdef bint add(self, bytes line, bint urgent)
    cpdef list take(self)

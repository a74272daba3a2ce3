# cython: language_level=3
# What spans.pyx declares for the other compiled modules (cimport): the request's server
# span is started, named and ended through these as C calls, not Python methods.

cdef class LeanTracer

cdef class LeanSpan:
    cdef public object name
    cdef public object context
    cdef public object parent
    cdef public object kind
    cdef public object attributes
    cdef public object events
    cdef public object links
    cdef public object status
    cdef public object start_time
    cdef public object end_time
    cdef LeanTracer _tracer
    cdef bint _record_exception
    cdef bint _set_status_on_exception
    cdef void _end(self, object end_time) except *


cdef class LeanTracer:
    cdef readonly object scope
    cdef readonly object resource
    cdef readonly list processors  # the provider's list: processors added later count
    cdef readonly tuple scope_row  # the scope's fields in a relay row, made once
    cdef object _sampler
    cdef bint _parent_based
    cdef object _root  # a root span's fixed answer (sampled, recording), if any
    cdef object _fixed  # every span's fixed answer, if any
    cpdef object start_span(
        self,
        name,
        context=*,
        kind=*,
        attributes=*,
        links=*,
        start_time=*,
        bint record_exception=*,
        bint set_status_on_exception=*,
    )


cdef object span_context_of(object span)
cpdef object attach(object context)
cpdef void detach(object token)
cpdef object with_span(object span, object context)

# cython: language_level=3
# An OpenTelemetry SpanContext is a tuple: (trace_id, span_id, is_remote, trace_flags,
# trace_state, is_valid), which is what its properties read. As a subclass of tuple it
# indexes through `__getitem__` (~750 instructions a field under callgrind) and each
# property is a Python call on top, so compiled code reads the fields as a tuple's items.
# tests/test_compiled.py checks the layout against the API's properties.

from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE

cdef enum:
    TRACE_ID = 0
    SPAN_ID = 1
    IS_REMOTE = 2
    TRACE_FLAGS = 3
    TRACE_STATE = 4
    IS_VALID = 5
    SAMPLED = 1  # bits of trace_flags
    RANDOM_TRACE_ID = 2


cdef inline object field(object span_context, Py_ssize_t index):
    """A SpanContext's field (a TypeError for anything that is not one)."""
    if not PyTuple_Check(span_context) or PyTuple_GET_SIZE(span_context) <= IS_VALID:
        raise TypeError(f"not a SpanContext: {type(span_context).__name__}")
    return <object>PyTuple_GET_ITEM(span_context, index)

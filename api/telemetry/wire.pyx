# cython: language_level=3
"""The worker's side of the span relay's wire (api/telemetry/relay.py): each span written
as it ends, and queued as bytes for the sender thread.

Our own spans (LeanSpan) are written here, in C, as the OTLP `Span` message the relay
would have written for them (api/telemetry/otlp.py; the tests compare the bytes), so the
relay only groups them by scope. Until session 12 each span was a 19-item list, written as
JSON in the worker (~8,800 instructions a span), read back and written as protobuf in
the relay (~6 µs a span); written here it is ~3,000 (docs/BENCHMARKS.md, session 12).

A span this writer leaves to the relay's row (`encode_row`): one with events or links,
an attribute value that is not a str, bool, int within 64 bits, float or None, a key that
is not exactly a str, text that is not valid Unicode, more or longer attributes than the
OTEL_SPAN_*/OTEL_ATTRIBUTE_* limits allow, a name that is not a str, a time that is not
an int in range, a kind the API does not define. The relay applies the limits to rows;
here a span they would change is not written at all, so what arrives is the same either
way (the tests compare the two writers' bytes, NaN and infinities included).

The fields that take a Python call to read (the trace state, the status, the scope) are
read before any byte is written, and the bytes go into a buffer of the call's own: only
a failure path makes an exception object, and a collection it started that ran a
finaliser which ended another span could not mix two spans' bytes.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next, PyDict_Size
from cpython.exc cimport PyErr_Clear
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLongMask
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from api.telemetry.spancontext cimport (
    IS_REMOTE,
    SAMPLED,
    SPAN_ID,
    TRACE_FLAGS,
    TRACE_ID,
    TRACE_STATE,
    field,
)
from api.telemetry.spans cimport LeanSpan, LeanTracer


cdef extern from *:
    """
    /* An id's bytes, most significant first, as OTLP carries them, straight from the
       int (CPython's own conversion, as int.to_bytes(n, "big") does it). */
    static int wire_id_bytes(PyObject* id, unsigned char* out, size_t size) {
        return _PyLong_AsByteArray((PyLongObject*)id, out, size, 0, 0);
    }
    """
    int wire_id_bytes(PyObject* id, unsigned char* out, size_t size) noexcept


cdef extern from "Python.h":
    # Declared here without an exception check: text that is not valid UTF-8 (a lone
    # surrogate) is a span for the row, not an error.
    const char* _utf8 "PyUnicode_AsUTF8AndSize"(PyObject* text, Py_ssize_t* size) noexcept
    bint PyUnicode_Check(PyObject* o) noexcept
    bint PyUnicode_CheckExact(PyObject* o) noexcept
    Py_ssize_t PyUnicode_GET_LENGTH(PyObject* o) noexcept
    bint PyLong_Check(PyObject* o) noexcept
    bint PyBool_Check(PyObject* o) noexcept
    bint PyFloat_Check(PyObject* o) noexcept
    PyObject* Py_True
    PyObject* Py_None

from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from api.telemetry.spans import UNSET_STATUS

# OTLP's span kind is the API's, counted from 1 (0 is "unspecified").
cdef tuple _KINDS = tuple(sorted(SpanKind, key=lambda kind: kind.value))
# OTLP span flags: the parent's remoteness is known, and whether it is remote.
cdef enum:
    HAS_REMOTE = 0x100
    PARENT_IS_REMOTE = 0x200
    ON_STACK = 1024  # most spans fit: a few hundred bytes


cdef struct Out:
    char* data
    Py_ssize_t length
    Py_ssize_t capacity
    char* heap  # data, once it outgrew the caller's stack buffer


cdef bint _room(Out* out, Py_ssize_t more) noexcept:
    """Room for `more` bytes, growing onto the heap if need be; False if memory is out."""
    if out.length + more <= out.capacity:
        return True
    cdef Py_ssize_t capacity = max(out.capacity * 2, out.length + more)
    cdef char* grown = <char*>PyMem_Malloc(capacity)
    if grown == NULL:
        return False
    memcpy(grown, out.data, out.length)
    PyMem_Free(out.heap)
    out.heap = out.data = grown
    out.capacity = capacity
    return True


cdef inline void _byte(Out* out, unsigned char value) noexcept:
    out.data[out.length] = <char>value
    out.length += 1


cdef inline Py_ssize_t _varint_size(uint64_t n) noexcept:
    cdef Py_ssize_t size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


cdef inline void _varint(Out* out, uint64_t n) noexcept:
    while n >= 0x80:
        _byte(out, (n & 0x7F) | 0x80)
        n >>= 7
    _byte(out, n)


cdef inline void _bytes(Out* out, const char* data, Py_ssize_t size) noexcept:
    memcpy(out.data + out.length, data, size)
    out.length += size


cdef inline void _text(Out* out, unsigned char tag, const char* data, Py_ssize_t size) noexcept:
    _byte(out, tag)
    _varint(out, size)
    _bytes(out, data, size)


cdef inline void _fixed(Out* out, uint64_t value, int size) noexcept:
    """Little-endian, as protobuf's fixed32 and fixed64."""
    cdef int i
    for i in range(size):
        _byte(out, value & 0xFF)
        value >>= 8


cdef inline bint _id(Out* out, object value, size_t size) noexcept:
    """An id's `size` bytes (16 or 8), most significant first; False if it is not an int
    (or, for 16 bytes, one that does not fit; 8 bytes are masked, as hex64 writes them)."""
    cdef uint64_t low
    cdef int shift
    if not PyLong_Check(<PyObject*>value):
        return False
    if size == 16:  # CPython's own conversion (int.to_bytes)
        if wire_id_bytes(<PyObject*>value, <unsigned char*>(out.data + out.length), 16) < 0:
            PyErr_Clear()
            return False
        out.length += 16
        return True
    # 8 bytes: the mask (which cannot fail on an int) is a few dozen instructions, the
    # general conversion a few hundred.
    low = PyLong_AsUnsignedLongLongMask(value)
    for shift in range(56, -8, -8):
        _byte(out, (low >> shift) & 0xFF)
    return True


cdef inline void _u32(Out* out, Py_ssize_t at, Py_ssize_t value) noexcept:
    """A big-endian length, written where room was kept for it."""
    out.data[at] = <char>((value >> 24) & 0xFF)
    out.data[at + 1] = <char>((value >> 16) & 0xFF)
    out.data[at + 2] = <char>((value >> 8) & 0xFF)
    out.data[at + 3] = <char>(value & 0xFF)


cdef bint _attribute(Out* out, PyObject* key, PyObject* value, Py_ssize_t max_length) noexcept:
    """A KeyValue under Span.attributes (field 9), as otlp._key_value writes it; False for
    one this writer leaves to the row."""
    cdef Py_ssize_t key_size, text_size = 0, value_size
    cdef const char* text = NULL
    cdef long long number = 0
    cdef int overflow = 0
    cdef double real = 0.0
    cdef uint64_t bits
    cdef int kind
    if not PyUnicode_CheckExact(key):
        return False
    cdef const char* key_text = _utf8(key, &key_size)
    if key_text == NULL:
        PyErr_Clear()
        return False
    if value == Py_None:
        kind = 0
        value_size = 0  # an AnyValue with nothing set
    elif PyUnicode_Check(value):
        if max_length > 0 and PyUnicode_GET_LENGTH(value) > max_length:
            return False  # the relay cuts it to the limit
        text = _utf8(value, &text_size)
        if text == NULL:
            PyErr_Clear()
            return False
        kind = 1
        value_size = 1 + _varint_size(text_size) + text_size
    elif PyBool_Check(value):
        kind = 2
        value_size = 2
    elif PyLong_Check(value):
        number = PyLong_AsLongLongAndOverflow(<object>value, &overflow)
        if overflow:
            return False  # beyond 64 bits: the relay drops the key, as the SDK does
        kind = 3
        value_size = 1 + _varint_size(<uint64_t>number)
    elif PyFloat_Check(value):
        real = PyFloat_AS_DOUBLE(<object>value)
        kind = 4
        value_size = 9
    else:
        return False
    cdef Py_ssize_t pair_size = (
        1 + _varint_size(key_size) + key_size + 1 + _varint_size(value_size) + value_size
    )
    if not _room(out, 1 + _varint_size(pair_size) + pair_size):
        return False
    _byte(out, 0x4A)
    _varint(out, pair_size)
    _text(out, 0x0A, key_text, key_size)
    _byte(out, 0x12)
    _varint(out, value_size)
    if kind == 1:
        _text(out, 0x0A, text, text_size)
    elif kind == 2:
        _byte(out, 0x10)
        _byte(out, 1 if value == Py_True else 0)
    elif kind == 3:
        _byte(out, 0x18)
        _varint(out, <uint64_t>number)  # int64 as protobuf writes it: two's complement
    elif kind == 4:
        _byte(out, 0x21)
        memcpy(&bits, &real, 8)  # the double's bits, as protobuf writes a double
        _fixed(out, bits, 8)
    return True


cdef object _span_record(
    LeanSpan span, bytes scope, Py_ssize_t max_attributes, Py_ssize_t max_length
):
    """The span's relay record (api/telemetry/relay.py): a 4-byte big-endian length, "P",
    the scope's length and JSON row, and the OTLP Span message; None to leave it to the
    row. `max_attributes`, `max_length`: the span limits, -1 for none."""
    if scope is None:
        raise TypeError("a span's scope must be bytes")
    if span.events or span.links:
        return None
    attributes = span.attributes
    if type(attributes) is not dict:
        return None
    if max_attributes >= 0 and PyDict_Size(attributes) > max_attributes:
        return None
    name = span.name
    if not PyUnicode_Check(<PyObject*>name):
        return None
    start = span.start_time
    end = span.end_time
    if not PyLong_Check(<PyObject*>start) or not PyLong_Check(<PyObject*>end):
        return None
    cdef int overflow_start = 0, overflow_end = 0
    cdef long long start_ns = PyLong_AsLongLongAndOverflow(start, &overflow_start)
    cdef long long end_ns = PyLong_AsLongLongAndOverflow(end, &overflow_end)
    if overflow_start or overflow_end or start_ns < 0 or end_ns < 0:
        return None
    cdef long kind = -1
    cdef Py_ssize_t i
    for i in range(len(_KINDS)):
        if span.kind is _KINDS[i]:
            kind = i + 1
            break
    if kind < 0:
        return None
    # What takes Python calls to read, read before any byte is written.
    context = span.context
    parent = span.parent
    state = field(context, TRACE_STATE)
    header = "" if state is DEFAULT_TRACE_STATE or not state else state.to_header()
    status = span.status
    cdef long code = 0
    description = None
    if status is not UNSET_STATUS:
        code = status.status_code._value_
        description = status.description
    if not PyUnicode_Check(<PyObject*>header) or (
        description is not None and not PyUnicode_Check(<PyObject*>description)
    ):
        return None
    trace_id = field(context, TRACE_ID)
    span_id = field(context, SPAN_ID)
    parent_id = None if parent is None else field(parent, SPAN_ID)
    cdef bint remote = parent is not None and field(parent, IS_REMOTE)

    cdef Py_ssize_t name_size, header_size, description_size = 0
    cdef const char* description_text = NULL
    cdef const char* name_text = _utf8(<PyObject*>name, &name_size)
    if name_text == NULL:
        PyErr_Clear()
        return None
    cdef const char* header_text = _utf8(<PyObject*>header, &header_size)
    if header_text == NULL:
        PyErr_Clear()
        return None
    if description is not None:
        description_text = _utf8(<PyObject*>description, &description_size)
        if description_text == NULL:
            PyErr_Clear()
            return None

    cdef char on_stack[ON_STACK]
    cdef Out out
    out.data = on_stack
    out.length = 0
    out.capacity = ON_STACK
    out.heap = NULL
    cdef Py_ssize_t scope_size = PyBytes_GET_SIZE(scope)
    cdef Py_ssize_t status_size = 0
    if description_size:
        status_size += 1 + _varint_size(description_size) + description_size
    if code:
        status_size += 1 + _varint_size(code)
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    try:
        # Every fixed field, and the lengths' varints at their longest (10 bytes).
        if not _room(&out, 128 + scope_size + name_size + header_size):
            return None
        out.length = 9  # the record's length, "P", the scope's length: written last
        _bytes(&out, PyBytes_AS_STRING(scope), scope_size)
        _byte(&out, 0x0A)
        _byte(&out, 16)
        if not _id(&out, trace_id, 16):
            return None
        _byte(&out, 0x12)
        _byte(&out, 8)
        if not _id(&out, span_id, 8):
            return None
        if header_size:
            _text(&out, 0x1A, header_text, header_size)
        if parent_id is not None:
            _byte(&out, 0x22)
            _byte(&out, 8)
            if not _id(&out, parent_id, 8):
                return None
        _text(&out, 0x2A, name_text, name_size)
        _byte(&out, 0x30)
        _varint(&out, kind)
        _byte(&out, 0x39)
        _fixed(&out, <uint64_t>start_ns, 8)
        _byte(&out, 0x41)
        _fixed(&out, <uint64_t>end_ns, 8)
        while PyDict_Next(attributes, &pos, &key, &value):
            if not _attribute(&out, key, value, max_length):
                return None
        if not _room(&out, 64 + description_size):
            return None
        _byte(&out, 0x7A)
        _varint(&out, status_size)
        if description_size:
            _text(&out, 0x12, description_text, description_size)
        if code:
            _byte(&out, 0x18)
            _varint(&out, code)
        _byte(&out, 0x85)  # field 16, fixed32
        _byte(&out, 0x01)
        _fixed(&out, HAS_REMOTE | (PARENT_IS_REMOTE if remote else 0), 4)
        _u32(&out, 0, out.length - 4)
        out.data[4] = b"P"
        _u32(&out, 5, scope_size)
        return PyBytes_FromStringAndSize(out.data, out.length)
    finally:
        PyMem_Free(out.heap)


cdef Py_ssize_t _limit(value) except? -2:
    """A SpanLimits value in C: -1 for none."""
    return -1 if value is None else value


cdef class SpanRows:
    """The span relay processor's queue (api/telemetry/relay.py): each span's record
    written as it ends, kept as bytes until the sender thread takes them. `put` runs under
    the GIL and calls no Python code between reading the queue and changing it, so the
    sender's `take` needs no lock."""

    cdef list _rows
    cdef Py_ssize_t _max
    cdef Py_ssize_t _batch
    cdef object _wake
    cdef object _encode_row
    cdef object _encode_resource
    cdef object _encode_scope
    cdef dict _scopes
    cdef Py_ssize_t _max_attributes
    cdef Py_ssize_t _max_length
    cdef public Py_ssize_t dropped
    cdef public bint stopped
    cdef public bytes resource

    def __init__(
        self,
        Py_ssize_t max_queue,
        Py_ssize_t batch,
        wake,
        encode_row,
        encode_resource,
        encode_scope,
        limits,
    ):
        """`encode_row`: the record of a span this module leaves to the relay's row;
        `encode_resource`: the frame's head, once; `encode_scope`: a tracer's scope row,
        once per tracer; `limits`: the SpanLimits the relay applies. `wake` is set when a
        batch is full."""
        self._rows = []
        self._max = max_queue
        self._batch = batch
        self._wake = wake
        self._encode_row = encode_row
        self._encode_resource = encode_resource
        self._encode_scope = encode_scope
        self._scopes = {}
        self._max_attributes = _limit(limits.max_span_attributes)
        self._max_length = _limit(limits.max_span_attribute_length)
        self.dropped = 0
        self.stopped = False
        self.resource = None

    def put(self, span):
        """A span ended (the processor's on_end): written and queued, or dropped if the
        queue is full or the span cannot be written; never raised."""
        cdef LeanSpan lean
        context = span.context
        if self.stopped or not context or not (field(context, TRACE_FLAGS) & SAMPLED):
            return
        try:
            if self.resource is None:
                self.resource = self._encode_resource(span.resource)
            record = None
            if type(span) is LeanSpan:
                lean = <LeanSpan>span
                scope = self._scopes.get(lean._tracer)
                if scope is None:
                    scope = self._scopes[lean._tracer] = self._encode_scope(lean._tracer.scope_row)
                try:
                    record = _span_record(lean, scope, self._max_attributes, self._max_length)
                except Exception:  # a trace state or status that cannot be read: the row's
                    record = None  # own rules decide
            if record is None:
                record = self._encode_row(span)
        except Exception:
            record = None
        if record is None or len(self._rows) >= self._max:
            self.dropped += 1
            return
        self._rows.append(record)
        if len(self._rows) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def take(self):
        """(records, how many were dropped) since the last take."""
        cdef list fresh = []  # made first: making it may run the garbage collector
        rows = self._rows
        self._rows = fresh
        cdef Py_ssize_t dropped = self.dropped
        self.dropped = 0
        return rows, dropped

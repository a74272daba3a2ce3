# cython: language_level=3
"""The worker's side of the span relay's wire (api/telemetry/relay.py): each span written
as it ends into the frame of its batch, which the sender thread sends.

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
read before the frame is even looked up: a collection one of them started, whose
finaliser ended another span, finishes that span's record before this one's begins, and
two spans' bytes never mix. Records go straight into the frame of their batch (`Frame`),
which the sender writes to the socket as it is and gives back to be written again.
"""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
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
    # A frame bigger than this is freed once sent rather than kept for the next batch
    # (a batch of 512 ordinary spans is ~130 KB).
    KEPT_FRAME = 1 << 20


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


cdef inline void _id8(Out* out, object value) noexcept:
    """An 8-byte id, most significant first, from an int (checked by the caller): masked,
    as hex64 writes it, which cannot fail and is a few dozen instructions where the
    general conversion is a few hundred."""
    cdef uint64_t low = PyLong_AsUnsignedLongLongMask(value)
    cdef int shift
    for shift in range(56, -8, -8):
        _byte(out, (low >> shift) & 0xFF)


cdef inline void _u32(Out* out, Py_ssize_t at, Py_ssize_t value) noexcept:
    """A big-endian length, written where room was kept for it."""
    out.data[at] = <char>((value >> 24) & 0xFF)
    out.data[at + 1] = <char>((value >> 16) & 0xFF)
    out.data[at + 2] = <char>((value >> 8) & 0xFF)
    out.data[at + 3] = <char>(value & 0xFF)


cdef bint _attribute(Out* out, PyObject* key, PyObject* value, Py_ssize_t max_length) noexcept:
    """A KeyValue under Span.attributes (field 9), as otlp._key_value writes it; False for
    one this writer leaves to the row. With `out` NULL, only whether it can be written:
    once that said True, writing it makes no object (the texts' UTF-8 is cached), so it
    cannot start a collection, and fails only if memory runs out."""
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
    if out == NULL:
        return True
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


cdef bint _write_span(
    SpanRows rows, LeanSpan span, bytes scope, Py_ssize_t max_attributes, Py_ssize_t max_length
) except -1:
    """The span's relay record (api/telemetry/relay.py), appended to the frame `rows` is
    writing: a 4-byte big-endian length, "P", the scope's length and JSON row, and the
    OTLP Span message. False, with the frame as it was, to leave the span to the row.
    `max_attributes`, `max_length`: the span limits, -1 for none."""
    if scope is None:
        raise TypeError("a span's scope must be bytes")
    if span.events or span.links:
        return False
    attributes = span.attributes
    if type(attributes) is not dict:
        return False
    if max_attributes >= 0 and PyDict_Size(attributes) > max_attributes:
        return False
    name = span.name
    if not PyUnicode_Check(<PyObject*>name):
        return False
    start = span.start_time
    end = span.end_time
    if not PyLong_Check(<PyObject*>start) or not PyLong_Check(<PyObject*>end):
        return False
    cdef int overflow_start = 0, overflow_end = 0
    cdef long long start_ns = PyLong_AsLongLongAndOverflow(start, &overflow_start)
    cdef long long end_ns = PyLong_AsLongLongAndOverflow(end, &overflow_end)
    if overflow_start or overflow_end or start_ns < 0 or end_ns < 0:
        return False
    cdef long kind = -1
    cdef Py_ssize_t i
    for i in range(len(_KINDS)):
        if span.kind is _KINDS[i]:
            kind = i + 1
            break
    if kind < 0:
        return False
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
        return False
    trace_id = field(context, TRACE_ID)
    span_id = field(context, SPAN_ID)
    parent_id = None if parent is None else field(parent, SPAN_ID)
    cdef bint remote = parent is not None and field(parent, IS_REMOTE)

    cdef Py_ssize_t name_size, header_size, description_size = 0
    cdef const char* description_text = NULL
    cdef const char* name_text = _utf8(<PyObject*>name, &name_size)
    if name_text == NULL:
        PyErr_Clear()
        return False
    cdef const char* header_text = _utf8(<PyObject*>header, &header_size)
    if header_text == NULL:
        PyErr_Clear()
        return False
    if description is not None:
        description_text = _utf8(<PyObject*>description, &description_size)
        if description_text == NULL:
            PyErr_Clear()
            return False

    cdef unsigned char trace_bytes[16]
    if not PyLong_Check(<PyObject*>trace_id) or not PyLong_Check(<PyObject*>span_id) or (
        parent_id is not None and not PyLong_Check(<PyObject*>parent_id)
    ):
        return False
    if wire_id_bytes(<PyObject*>trace_id, trace_bytes, 16) < 0:  # CPython's int.to_bytes
        PyErr_Clear()
        return False
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    while PyDict_Next(attributes, &pos, &key, &value):
        if not _attribute(NULL, key, value, max_length):
            return False

    # Only now the frame. Everything above may make objects, and so start a collection
    # whose finaliser ends another span; that span's record goes into the frame at once,
    # and may fill it and hand it to the sender. From here on nothing makes an object
    # and nothing can fail but memory, so two records never mix.
    cdef Frame frame = rows._frame()
    cdef Out* out = &frame.out
    cdef Py_ssize_t begun = out.length
    cdef Py_ssize_t scope_size = PyBytes_GET_SIZE(scope)
    cdef Py_ssize_t status_size = 0
    if description_size:
        status_size += 1 + _varint_size(description_size) + description_size
    if code:
        status_size += 1 + _varint_size(code)
    pos = 0
    # Every fixed field, and the lengths' varints at their longest (10 bytes).
    if not _room(out, 128 + scope_size + name_size + header_size):
        return False
    out.length += 9  # the record's length, "P", the scope's length: written last
    _bytes(out, PyBytes_AS_STRING(scope), scope_size)
    _byte(out, 0x0A)
    _byte(out, 16)
    _bytes(out, <const char*>trace_bytes, 16)
    _byte(out, 0x12)
    _byte(out, 8)
    _id8(out, span_id)
    if header_size:
        _text(out, 0x1A, header_text, header_size)
    if parent_id is not None:
        _byte(out, 0x22)
        _byte(out, 8)
        _id8(out, parent_id)
    _text(out, 0x2A, name_text, name_size)
    _byte(out, 0x30)
    _varint(out, kind)
    _byte(out, 0x39)
    _fixed(out, <uint64_t>start_ns, 8)
    _byte(out, 0x41)
    _fixed(out, <uint64_t>end_ns, 8)
    while PyDict_Next(attributes, &pos, &key, &value):
        if not _attribute(out, key, value, max_length):  # memory only, now
            out.length = begun
            return False
    if not _room(out, 64 + description_size):
        out.length = begun
        return False
    _byte(out, 0x7A)
    _varint(out, status_size)
    if description_size:
        _text(out, 0x12, description_text, description_size)
    if code:
        _byte(out, 0x18)
        _varint(out, code)
    _byte(out, 0x85)  # field 16, fixed32
    _byte(out, 0x01)
    _fixed(out, HAS_REMOTE | (PARENT_IS_REMOTE if remote else 0), 4)
    _u32(out, begun, out.length - begun - 4)
    out.data[begun + 4] = b"P"
    _u32(out, begun + 5, scope_size)
    return True


cdef Py_ssize_t _limit(value) except? -2:
    """A SpanLimits value in C: -1 for none."""
    return -1 if value is None else value


@cython.final
cdef class Frame:
    """A batch of span records as the relay reads it: a 4-byte big-endian length, the
    resource head, the records. Written in place as spans end; the sender writes it to
    the socket as it is (the buffer protocol, no copy) and gives it back to its queue,
    which writes the next batch over the same memory. A frame per batch, or a bytes object
    per span joined into one, put a ~130 KB allocation and two cold copies on the worker
    every few hundred requests, and the allocator's reuse of that memory made the
    response's own buffers miss the cache (docs/BENCHMARKS.md, session 14)."""

    cdef Out out
    cdef readonly Py_ssize_t records
    cdef int exports

    def __dealloc__(self):
        PyMem_Free(self.out.heap)

    def __len__(self):
        return self.out.length

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.out.data, self.out.length, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1


cdef class SpanRows:
    """The span relay processor's queue (api/telemetry/relay.py): each span's record
    written as it ends into the frame of its batch, frames kept until the sender thread
    takes them. `put` runs under the GIL and calls no Python code between reading the
    queue and changing it, so the sender's `take` and `give_back` need no lock."""

    cdef list _ready  # full frames
    cdef Frame _current  # the frame being written, None until a span comes
    cdef list _spare  # frames sent and given back, to be written again
    cdef Py_ssize_t _queued  # records in _ready and _current
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
        self._ready = []
        self._current = None
        self._spare = []
        self._queued = 0
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
        cdef Frame frame
        cdef bint written = False
        context = span.context
        if self.stopped or not context or not (field(context, TRACE_FLAGS) & SAMPLED):
            return
        if self._queued >= self._max:
            self.dropped += 1
            return
        try:
            if self.resource is None:
                self.resource = self._encode_resource(span.resource)
            if type(span) is LeanSpan:
                lean = <LeanSpan>span
                scope = self._scopes.get(lean._tracer)
                if scope is None:
                    scope = self._scopes[lean._tracer] = self._encode_scope(lean._tracer.scope_row)
                try:
                    written = _write_span(
                        self, lean, scope, self._max_attributes, self._max_length
                    )
                except Exception:  # a trace state or status that cannot be read: the row's
                    written = False  # own rules decide
            if written:
                frame = self._current
            else:
                record = self._encode_row(span)
                if type(record) is not bytes:
                    raise TypeError("a span's row record is bytes")
                # Found again: the row ran Python code, and a span it ended may have
                # filled the frame and handed it to the sender.
                frame = self._frame()
                if not _room(&frame.out, PyBytes_GET_SIZE(record)):
                    raise MemoryError
                _bytes(&frame.out, PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record))
        except Exception:
            self.dropped += 1
            return
        frame.records += 1
        self._queued += 1
        if frame.records >= self._batch:
            self._close()
            if not self._wake.is_set():
                self._wake.set()

    cdef Frame _frame(self):
        """The frame being written, begun with its head if it is new."""
        cdef Frame frame = self._current
        if frame is not None:
            return frame
        frame = self._spare.pop() if self._spare else None
        if frame is None or frame.exports:  # one still read is never written over
            frame = Frame.__new__(Frame)
        frame.out.length = 0
        frame.records = 0
        cdef Py_ssize_t head = PyBytes_GET_SIZE(self.resource)
        if not _room(&frame.out, 4 + head):
            raise MemoryError
        frame.out.length = 4  # the frame's length: written when it is closed
        _bytes(&frame.out, PyBytes_AS_STRING(self.resource), head)
        self._current = frame
        return frame

    cdef void _close(self):
        """The frame being written, finished and made ready to send."""
        cdef Frame frame = self._current
        _u32(&frame.out, 0, frame.out.length - 4)
        self._ready.append(frame)
        self._current = None

    def take(self):
        """(frames, how many spans were dropped) since the last take."""
        cdef list fresh = []  # made first: making it may run the garbage collector
        if self._current is not None and self._current.records:
            self._close()
        frames = self._ready
        self._ready = fresh
        self._queued = 0
        cdef Py_ssize_t dropped = self.dropped
        self.dropped = 0
        return frames, dropped

    def give_back(self, Frame frame):
        """A taken frame, sent (or dropped): its memory is written again by a later batch,
        unless it grew past KEPT_FRAME or is still being read."""
        if frame.exports == 0 and frame.out.capacity <= KEPT_FRAME and len(self._spare) < 2:
            frame.out.length = 0
            frame.records = 0
            self._spare.append(frame)

# cython: language_level=3
"""A lean OpenTelemetry tracer: the API's TracerProvider, Tracer and Span, built for the
hot path, with the SDK kept for everything that is not per span.

Why not the SDK's own `Tracer`: a cached answer is ~350 µs of work, and the SDK spends
~18 µs on each span before it is exported — sampler result objects, attribute validation
into a locked `BoundedAttributes`, a multi-processor fan-out, internal metrics — and in a
busy worker, with cold caches, about twice that (docs/BENCHMARKS.md). This span is a
plain record: ids, times, a dict of attributes. The SDK still does the rest:

- sampling: the sampler is the SDK's, built from OTEL_TRACES_SAMPLER(_ARG); it decides
  every root span and every span under a remote parent. Under a local parent a
  parent-based sampler (the default) takes the parent's decision without a call;
- batching: finished spans go to the span processors (the relay's, or the SDK's
  `BatchSpanProcessor` without the relay), which keep the OTEL_BSP_* rules;
- export: finished spans read like the SDK's `ReadableSpan`, so both the span relay and
  the SDK's OTLP exporter take them as they are. Attribute limits (OTEL_SPAN_*_LIMIT)
  are applied by the relay, off the request path; a process without the relay (a bare
  uvicorn, the tests) exports through the SDK's exporter directly, without them.

Without a span processor (no exporter configured) spans are not recorded at all: they
are contexts, which still put trace and span ids in the logs and propagate the trace.

The instrumentations (httpx) see an ordinary API tracer. Two things the SDK offers are
left out because nothing here uses them: span processors get `on_end` only (the batch
processor's `on_start` does nothing), and `start_as_current_span` is a context manager,
not also a decorator.

Compiled with Cython (`pip install -e .` builds it; after editing, run it again): every
span passes through here, and as interpreted Python its few dozen steps cost several µs a
span in a busy worker. The span, the tracer and the current-span context manager are
extension types, registered as the API's `Span` and `Tracer` (the API checks
`isinstance`); the current context is read and set through the API's own ContextVar
when the runtime context is the default one, as OpenTelemetry's own would.
"""

from cpython.contextvars cimport PyContextVar_Reset, PyContextVar_Set, get_value
from cpython.dict cimport PyDict_Copy, PyDict_SetItem
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from api.telemetry.hexids cimport hex64, hex128
from api.telemetry.spancontext cimport (
    IS_REMOTE,
    IS_VALID,
    RANDOM_TRACE_ID,
    SAMPLED,
    SPAN_ID,
    TRACE_FLAGS,
    TRACE_ID,
    TRACE_STATE,
    field,
)


cdef extern from *:
    """
    /* An empty instance of a tuple subclass with `size` slots, from its own allocator:
       what tuple.__new__(cls, items) makes before it copies the items in. */
    static PyObject* new_instance(PyObject* type, Py_ssize_t size) {
        return ((PyTypeObject*)type)->tp_alloc((PyTypeObject*)type, size);
    }
    """
    object new_instance(object type, Py_ssize_t size)


import atexit
import random
import traceback

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import _RUNTIME_CONTEXT
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import Event
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, StaticSampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.trace.status import Status, StatusCode

# The flags a new span gets, as the SDK sets them, by their bits: index SAMPLED |
# RANDOM_TRACE_ID (a tuple's item: no key to build per span).
cdef tuple _FLAGS = tuple(TraceFlags(bits) for bits in range(4))
# A new span's status; api/telemetry/wire.pyx knows it by identity.
UNSET_STATUS = Status(StatusCode.UNSET)
_OK = StatusCode.OK
_INTERNAL = SpanKind.INTERNAL
_getrandbits = random.getrandbits  # reseeded in every forked worker by the random module
_Context = context_api.Context
# The default runtime context keeps the current Context in one ContextVar; read and set
# it directly, with the C API's calls rather than the variable's methods (what its
# get_current/attach do). Another runtime (OTEL_PYTHON_CONTEXT) goes through the API.
_CURRENT = (
    _RUNTIME_CONTEXT._current_context
    if type(_RUNTIME_CONTEXT) is ContextVarsRuntimeContext
    else None
)


cpdef object current_context():
    """The current OpenTelemetry Context (`opentelemetry.context.get_current()`)."""
    if _CURRENT is not None:
        return get_value(_CURRENT)  # the variable's default (an empty Context) if unset
    return context_api.get_current()


cpdef object attach(object context):
    """`opentelemetry.context.attach`."""
    if _CURRENT is not None:
        return PyContextVar_Set(_CURRENT, context)
    return context_api.attach(context)


cpdef void detach(object token):
    """`opentelemetry.context.detach`: a token from another context is logged, not
    raised, by the API's own function."""
    if _CURRENT is not None:
        try:
            PyContextVar_Reset(_CURRENT, token)
            return
        except Exception:
            pass
    context_api.detach(token)


cdef object _now():
    """time.time_ns() (the same clock), without a Python call: two a span."""
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    return <long long>now.tv_sec * 1000000000 + now.tv_nsec


cpdef object with_span(object span, object context):
    """`trace.set_span_in_context(span, context)`: a copy of the context with the span
    set in it before anyone else holds it (a Context refuses item assignment in Python;
    the C call sets it as the API's copy-then-wrap would, with one copy less)."""
    values = _Context(current_context() if context is None else context)
    PyDict_SetItem(values, _SPAN_KEY, span)
    return values


cpdef object current_span(object context):
    """`trace.get_current_span(context)`."""
    span = (current_context() if context is None else context).get(_SPAN_KEY)
    if span is None:
        return trace.INVALID_SPAN
    # Our spans first: `isinstance` against the API's abstract class goes through ABCMeta
    # (~3,500 instructions a call).
    if type(span) is LeanSpan or type(span) is NonRecordingSpan or isinstance(span, trace.Span):
        return span
    return trace.INVALID_SPAN


cdef object span_context_of(object span):
    """`span.get_span_context()`."""
    if type(span) is LeanSpan:
        return (<LeanSpan>span).context
    if type(span) is NonRecordingSpan:  # what its get_span_context returns, without the call
        return span._context
    return span.get_span_context()


cdef object _span_context(object trace_id, object span_id, object flags, object state):
    """SpanContext(trace_id, span_id, False, flags, state, True), made as tuple.__new__
    makes a tuple subclass's instance, without the Python call and the argument tuple it
    copies (SpanContext's own __new__ checks what is known here: both ids are in range)."""
    span_context = new_instance(SpanContext, 6)
    _put(span_context, TRACE_ID, trace_id)
    _put(span_context, SPAN_ID, span_id)
    _put(span_context, IS_REMOTE, False)
    _put(span_context, TRACE_FLAGS, flags)
    _put(span_context, TRACE_STATE, DEFAULT_TRACE_STATE if state is None else state)
    _put(span_context, IS_VALID, True)
    return span_context


cdef inline void _put(object items, Py_ssize_t index, object value):
    Py_INCREF(value)  # the slot takes a reference of its own
    PyTuple_SET_ITEM(items, index, value)


cdef class LeanSpan:
    """A recording span. Once ended it is also the read-only view the exporters read
    (the fields of the SDK's `ReadableSpan`)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("a LeanSpan is made by LeanTracer.start_span")

    @property
    def dropped_attributes(self):
        return 0

    @property
    def dropped_events(self):
        return 0

    @property
    def dropped_links(self):
        return 0

    @property
    def resource(self):
        return self._tracer.resource

    @property
    def instrumentation_scope(self):
        return self._tracer.scope

    def get_span_context(self):
        return self.context

    def is_recording(self):
        return self.end_time is None

    def set_attribute(self, key, value):
        if self.end_time is None:
            self.attributes[key] = value

    def set_attributes(self, attributes):
        if self.end_time is None:
            self.attributes.update(attributes)

    # A span's events and links are the shared empty tuple until it has one (most never
    # do): two lists less to make and free a span.
    def add_event(self, name, attributes=None, timestamp=None):
        if self.end_time is None:  # copied: the caller may reuse its dict
            event = Event(name, dict(attributes or {}), timestamp or _now())
            if self.events:
                self.events.append(event)
            else:
                self.events = [event]

    def add_link(self, context, attributes=None):
        if self.end_time is None and _valid_link(context, attributes):
            link = Link(context, dict(attributes or {}))
            if self.links:
                self.links.append(link)
            else:
                self.links = [link]

    def update_name(self, name):
        if self.end_time is None:
            self.name = name

    def set_status(self, status, description=None):
        # The SDK's rules: OK is final, UNSET never overrides.
        if self.end_time is not None or self.status.status_code is _OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(self, exception, attributes=None, timestamp=None, escaped=False):
        kind = type(exception)
        module = kind.__module__
        name = kind.__qualname__ if module in ("builtins", "") else f"{module}.{kind.__qualname__}"
        fields = {
            "exception.type": name,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        fields.update(attributes or {})
        self.add_event("exception", fields, timestamp)

    def end(self, end_time=None):
        self._end(end_time)

    cdef void _end(self, object end_time) except *:
        """Ended at `end_time` (None: now) and handed to the processors, once."""
        if self.end_time is not None:
            return
        self.end_time = end_time or _now()
        for processor in self._tracer.processors:
            processor.on_end(self)

    def row(self):
        """The span relay's row for this ended span (api/telemetry/relay.py): what
        `relay.encode_row` builds from any ReadableSpan, built here from the fields
        directly. Only a span api/telemetry/wire.pyx leaves to the relay comes here."""
        ctx = self.context
        parent = self.parent
        state = field(ctx, TRACE_STATE)
        status = self.status
        return [
            self.name,
            hex128(field(ctx, TRACE_ID)),
            hex64(field(ctx, SPAN_ID)),
            field(ctx, TRACE_FLAGS),
            "" if state is DEFAULT_TRACE_STATE or not state else state.to_header(),
            None if parent is None else hex64(field(parent, SPAN_ID)),
            parent is not None and field(parent, IS_REMOTE),
            self.kind._value_,
            self.start_time,
            self.end_time,
            self.attributes,
            status.status_code._value_,
            status.description,
            [[e.name, e.timestamp, plain(e.attributes)] for e in self.events]
            if self.events
            else [],
            [
                [
                    hex128(link.context.trace_id),
                    hex64(link.context.span_id),
                    int(link.context.trace_flags),
                    plain(link.attributes),
                    link.context.is_remote,
                ]
                for link in self.links
            ]
            if self.links
            else [],
            *self._tracer.scope_row,
        ]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        # Any exception, as the SDK's Span.__exit__ (use_span, below, takes Exception only).
        if exc_val is not None and self.end_time is None:
            _failed(self, exc_val, self._record_exception, self._set_status_on_exception, True)
        self._end(None)


trace.Span.register(LeanSpan)


cpdef object plain(object attributes):
    """A dict as it is (an ended span's attributes no longer change); the SDK's bounded
    mappings copied into one."""
    return attributes if type(attributes) is dict else dict(attributes or {})


cdef bint _valid_link(object context, object attributes):
    """The SDK's rule: a link needs a valid context, or at least attributes or a state."""
    return bool(context and (context.is_valid or attributes or context.trace_state))


cdef void _failed(object span, object exc, bint record, bint set_status, bint escaped):
    # `escaped` as the SDK has it: True from a span's own __exit__, False from use_span.
    if record:
        span.record_exception(exc, escaped=escaped)
    if set_status:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


cdef class _Current:
    """`start_as_current_span`'s context manager: the API's `use_span`, with the same
    exception rules."""

    cdef object span
    cdef object token
    cdef bint end_on_exit
    cdef bint record
    cdef bint set_status

    def __enter__(self):
        self.token = attach(with_span(self.span, None))
        return self.span

    def __exit__(self, exc_type, exc_val, exc_tb):
        detach(self.token)
        if isinstance(exc_val, Exception) and self.span.is_recording():
            _failed(self.span, exc_val, self.record, self.set_status, False)
        if self.end_on_exit:
            self.span.end()


def _static(sampler):
    """(sampled, recording) if `sampler` answers the same for every span, else None. The
    SDK's own class only: a subclass may answer otherwise."""
    if type(sampler) is StaticSampler:
        decision = sampler._decision
        return decision.is_sampled(), decision.is_recording()
    return None


def _follows_local_parents(sampler):
    """The SDK's parent-based sampler as OTEL_TRACES_SAMPLER builds it: under a local
    parent it takes the parent's decision. Not one with other delegates, or a subclass
    that decides for itself."""
    return (
        isinstance(sampler, ParentBased)
        and type(sampler).should_sample is ParentBased.should_sample
        and sampler._local_parent_sampled is ALWAYS_ON
        and sampler._local_parent_not_sampled is ALWAYS_OFF
    )


cdef class LeanTracer:
    def __init__(self, provider, scope):
        self.scope = scope
        self.scope_row = (scope.name, scope.version, scope.schema_url, plain(scope.attributes))
        self.resource = provider.resource
        self.processors = provider.processors
        self._sampler = sampler = provider.sampler
        self._parent_based = _follows_local_parents(sampler)
        self._root = None
        self._fixed = None
        if self._parent_based:
            self._root = _static(sampler._root)
        elif not isinstance(sampler, ParentBased):
            # always_on / always_off on their own: one answer for every span.
            self._root = self._fixed = _static(sampler)

    # cpdef: the API's method, and a C call for the compiled request path.
    cpdef object start_span(
        self,
        name,
        context=None,
        kind=_INTERNAL,
        attributes=None,
        links=(),
        start_time=None,
        bint record_exception=True,
        bint set_status_on_exception=True,
    ):
        cdef bint sampled, recording, random_id
        parent = span_context_of(current_span(context))
        cdef long parent_flags = 0
        if parent is not None and field(parent, IS_VALID):
            trace_id = field(parent, TRACE_ID)
            parent_flags = field(parent, TRACE_FLAGS)
            random_id = parent_flags & RANDOM_TRACE_ID
        else:
            parent = None
            trace_id = _getrandbits(128) or 1
            random_id = True
        if not attributes:
            span_attributes = {}
        elif type(attributes) is dict:
            span_attributes = PyDict_Copy(attributes)
        else:
            span_attributes = dict(attributes)
        if parent is not None and not field(parent, IS_REMOTE) and self._parent_based:
            # What the parent-based sampler answers under a local parent, without the call.
            sampled = recording = parent_flags & SAMPLED
            state = field(parent, TRACE_STATE)
        elif self._fixed is not None:
            # What a fixed sampler answers, without the call: its decision, and the
            # parent's trace state carried on.
            sampled, recording = self._fixed
            state = field(parent, TRACE_STATE) if parent is not None else None
        elif parent is None and self._root is not None:
            # A root under an always-on or always-off sampler (the default is always-on
            # under parent-based): its answer is fixed, without the call.
            sampled, recording = self._root
            state = None
        else:
            result = self._sampler.should_sample(
                context, trace_id, name, kind, attributes, links or ()
            )
            sampled = result.decision.is_sampled()
            recording = result.decision.is_recording()
            state = result.trace_state
            if result.attributes:
                span_attributes.update(result.attributes)
        span_context = _span_context(
            trace_id,
            _getrandbits(64) or 1,
            _FLAGS[(SAMPLED if sampled else 0) | (RANDOM_TRACE_ID if random_id else 0)],
            state,
        )
        if not recording or not self.processors:
            # With no processor to receive it (no exporter configured), a recorded span
            # would be work no one reads: its context still gives logs their ids and
            # carries the trace on to what is called next.
            return NonRecordingSpan(span_context)
        cdef LeanSpan span = LeanSpan.__new__(LeanSpan)
        span._tracer = self
        span.name = name
        span.context = span_context
        span.parent = parent
        span.kind = kind
        span.attributes = span_attributes
        span.links = span.events = ()
        if links:
            valid = [link for link in links if _valid_link(link.context, link.attributes)]
            if valid:
                span.links = valid
        span.status = UNSET_STATUS
        span.start_time = start_time or _now()
        span.end_time = None
        span._record_exception = record_exception
        span._set_status_on_exception = set_status_on_exception
        return span

    # The API declares a generator-based context manager; a class does the same for less.
    def start_as_current_span(
        self,
        name,
        context=None,
        kind=_INTERNAL,
        attributes=None,
        links=(),
        start_time=None,
        bint record_exception=True,
        bint set_status_on_exception=True,
        bint end_on_exit=True,
    ):
        cdef _Current current = _Current.__new__(_Current)
        current.span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        current.end_on_exit = end_on_exit
        current.record = record_exception
        current.set_status = set_status_on_exception
        return current


trace.Tracer.register(LeanTracer)


class LeanTracerProvider(trace.TracerProvider):
    def __init__(self, resource, sampler):
        self.resource = resource
        self.sampler = sampler
        self.processors = []
        self._tracers = {}
        atexit.register(self.shutdown)

    def add_span_processor(self, processor):
        """The processor's `on_end` receives every finished span; `on_start` is not called."""
        self.processors.append(processor)

    def get_tracer(
        self,
        instrumenting_module_name,
        instrumenting_library_version=None,
        schema_url=None,
        attributes=None,
    ):
        key = (instrumenting_module_name, instrumenting_library_version, schema_url)
        if key not in self._tracers:
            scope = InstrumentationScope(
                instrumenting_module_name, instrumenting_library_version, schema_url, attributes
            )
            self._tracers[key] = LeanTracer(self, scope)
        return self._tracers[key]

    def force_flush(self, timeout_millis=30000):
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self):
        for processor in self.processors:
            processor.shutdown()
        self.processors.clear()

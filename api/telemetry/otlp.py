# cython: annotation_typing=False
"""OTLP's ExportTraceServiceRequest written straight as protobuf bytes, for the span relay.

Building the request as protobuf message objects and serialising them cost the relay
about 20 µs a span, most of it in creating the objects: a span is some forty of them
(attributes, their values, status, scope). Written directly it is a few byte strings
joined, and an attribute that recurs on every span (`db.system.name = redis`) is
encoded once and remembered. The output is the same message: the tests parse it with
opentelemetry-proto and compare it with what the SDK's own encoder makes.

Compiled by Cython as it is (pyproject.toml; ~1.5x faster, docs/BENCHMARKS.md, session
11), with annotation typing off (the first line) so that the compiled module accepts
exactly what the interpreted one does: an int or str subclass, say.

Field numbers and wire types are those of opentelemetry/proto/trace/v1/trace.proto,
common/v1/common.proto and resource/v1/resource.proto (stable since OTLP 1.0).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from opentelemetry.sdk.trace import SpanLimits

BYTES_TAG = "\x00bytes"  # how a bytes value travels in a relay row (JSON has none)
# How a float JSON cannot carry (NaN, an infinity) travels: its 64 bits, as an int.
FLOAT_TAG = "\x00float"
# OTLP span flags: whether the parent is known to be remote, and if it is.
_HAS_REMOTE, _IS_REMOTE = 0x100, 0x200
_INT64 = (-(2**63), 2**63)
_SMALL = [bytes((i,)) for i in range(128)]
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    """Non-negative only (a negative `n` raises ValueError): int64 values are masked to
    their two's complement before they get here, as protobuf writes them."""
    if 0 <= n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field: its tag, the length, the bytes."""
    return tag + _varint(len(data)) + data


def _text(tag: bytes, text: str | None) -> bytes:
    """A string field; None is the empty string, as protobuf's own constructors take it."""
    return _field(tag, text.encode()) if text else tag + b"\x00"


class _Unencodable(ValueError):
    """A value OTLP cannot carry: an integer beyond 64 bits (or, as for the SDK's encoder,
    text that is not valid Unicode: UnicodeEncodeError is a ValueError too)."""


def _value(value: Any, length: int | None) -> bytes:
    """An AnyValue message, as the SDK's encoder writes it, strings cut to `length`."""
    if value is None:
        return b""  # an AnyValue with nothing set
    if isinstance(value, str):
        return _text(b"\x0a", value[:length] if length else value)
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        if not _INT64[0] <= value < _INT64[1]:
            raise _Unencodable(value)
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, list):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(v, length)) for v in value))
    if isinstance(value, dict):
        if list(value) == [BYTES_TAG]:
            return _field(b"\x3a", base64.b64decode(value[BYTES_TAG]))
        if list(value) == [FLOAT_TAG]:
            return b"\x21" + _fixed64(value[FLOAT_TAG])
        return _field(b"\x32", b"".join(_field(b"\x0a", kv) for kv in _key_values(value, length)))
    return _text(b"\x0a", str(value))


_remembered: dict[tuple[Any, ...], bytes] = {}


def _key_value(key: Any, value: Any, length: int | None) -> bytes:
    """A KeyValue message. Short strings, ints and bools are remembered: most attributes
    recur span after span. The type is part of the key (True == 1 as dict keys); floats
    are not remembered (0.0 == -0.0, which protobuf writes apart), nor long strings (a
    few thousand of those would be a lot of memory)."""
    kind = type(value)
    scalar = kind is int or kind is bool or (kind is str and len(value) < 256)
    if scalar:
        found = _remembered.get((key, kind, value, length))
        if found is not None:
            return found
    encoded = _text(b"\x0a", str(key)) + _field(b"\x12", _value(value, length))
    if scalar:
        if len(_remembered) >= 4096:  # request ids and the like would grow it forever
            _remembered.clear()
        _remembered[(key, kind, value, length)] = encoded
    return encoded


def _key_values(attributes: dict[str, Any], length: int | None) -> list[bytes]:
    encoded = []
    for key, value in attributes.items():
        try:
            encoded.append(_key_value(key, value, length))
        except ValueError:  # like the SDK: the key is lost, not the span
            continue
    return encoded


def _attributes(
    tag: bytes, attributes: dict[str, Any], count: int | None, length: int | None
) -> tuple[bytes, int]:
    """Repeated KeyValue fields under `tag`, and how many the count limit dropped. As the
    SDK: the newest `count` are kept."""
    dropped = 0
    if count is not None and len(attributes) > count:
        dropped = len(attributes) - count
        attributes = dict(list(attributes.items())[dropped:])
    return b"".join(_field(tag, kv) for kv in _key_values(attributes, length)), dropped


def _newest(items: list[Any], count: int | None) -> tuple[list[Any], int]:
    if count is None or len(items) <= count:
        return items, 0
    return (items[len(items) - count :] if count else []), len(items) - count


def _count(tag: bytes, n: int) -> bytes:
    return tag + _varint(n) if n else b""


def _event(row: list[Any], limits: SpanLimits) -> bytes:
    name, time, attributes = row
    encoded, dropped = _attributes(
        b"\x1a", attributes, limits.max_event_attributes, limits.max_attribute_length
    )
    return b"\x09" + _fixed64(time) + _text(b"\x12", name) + encoded + _count(b"\x20", dropped)


def _link(row: list[Any], limits: SpanLimits) -> bytes:
    trace_id, span_id, _flags, attributes, remote = row
    encoded, dropped = _attributes(
        b"\x22", attributes, limits.max_link_attributes, limits.max_attribute_length
    )
    return (
        b"\x0a\x10"
        + bytes.fromhex(trace_id)
        + b"\x12\x08"
        + bytes.fromhex(span_id)
        + encoded
        + _count(b"\x28", dropped)
        + b"\x35"
        + _fixed32(_HAS_REMOTE | (_IS_REMOTE if remote else 0))
    )


def _span(row: list[Any], limits: SpanLimits) -> bytes:
    """One Span message from a relay row."""
    (
        name,
        trace_id,
        span_id,
        _flags,  # OTLP carries the parent's remoteness, not the W3C flags (as the SDK)
        state,
        parent_id,
        parent_remote,
        kind,
        start,
        end,
        attributes,
        status_code,
        status_description,
        events,
        links,
        *_scope,
    ) = row
    encoded, dropped = _attributes(
        b"\x4a", attributes, limits.max_span_attributes, limits.max_span_attribute_length
    )
    kept_events, dropped_events = _newest(events, limits.max_events)
    kept_links, dropped_links = _newest(links, limits.max_links)
    status = (_text(b"\x12", status_description) if status_description else b"") + _count(
        b"\x18", status_code
    )
    parts = [
        b"\x0a\x10",
        bytes.fromhex(trace_id),
        b"\x12\x08",
        bytes.fromhex(span_id),
        _text(b"\x1a", state) if state else b"",
        b"\x22\x08" + bytes.fromhex(parent_id) if parent_id else b"",
        _text(b"\x2a", name),
        b"\x30",
        _varint(kind + 1),  # the API's SpanKind counts from 0, OTLP's from 1 (unspecified)
        b"\x39",
        _fixed64(start),
        b"\x41",
        _fixed64(end),
        encoded,
        _count(b"\x50", dropped),
        *(_field(b"\x5a", _event(event, limits)) for event in kept_events),
        _count(b"\x60", dropped_events),
        *(_field(b"\x6a", _link(link, limits)) for link in kept_links),
        _count(b"\x70", dropped_links),
        _field(b"\x7a", status),
        b"\x85\x01",  # field 16, fixed32
        _fixed32(_HAS_REMOTE | (_IS_REMOTE if parent_remote else 0)),
    ]
    return b"".join(parts)


class Written:
    """A span the worker wrote as an OTLP Span message itself (api/telemetry/wire.pyx),
    and its instrumentation scope's row: [name, version, schema_url, attributes]."""

    __slots__ = ("scope", "span")

    def __init__(self, scope: list[Any], span: bytes) -> None:
        self.scope = scope
        self.span = span


def _frozen(attributes: dict[str, Any]) -> Any:
    return repr(sorted(attributes.items(), key=lambda kv: kv[0])) if attributes else ""


def encode_request(message: dict[str, Any], limits: SpanLimits | None = None) -> bytes:
    """A relay frame (decoded) as the serialised ExportTraceServiceRequest the SDK's
    exporter would send for its spans: rows, written here, and spans the worker wrote
    (`Written`), grouped by scope in the order they came. Attribute, event and link
    limits (OTEL_SPAN_*_LIMIT, OTEL_ATTRIBUTE_*) are applied to rows here, off the request
    path; the worker writes no span those limits would change."""
    limits = limits or SpanLimits()
    scopes: dict[tuple[Any, ...], tuple[bytes, str, list[bytes]]] = {}
    for item in message["spans"]:
        if type(item) is Written:
            span, scope_row = item.span, item.scope
        else:
            span, scope_row = _span(item, limits), item[15:19]
        scope_name, scope_version, scope_schema_url, scope_attributes = scope_row
        key = (scope_name, scope_version, scope_schema_url, _frozen(scope_attributes))
        if key not in scopes:
            scope = (
                _text(b"\x0a", scope_name)
                + (_text(b"\x12", scope_version) if scope_version else b"")
                + _attributes(b"\x1a", scope_attributes or {}, None, None)[0]
            )
            scopes[key] = (scope, scope_schema_url or "", [])
        scopes[key][2].append(span)
    scope_spans = b"".join(
        _field(
            b"\x12",
            _field(b"\x0a", scope)
            + b"".join(_field(b"\x12", span) for span in spans)
            + (_text(b"\x1a", schema_url) if schema_url else b""),
        )
        for scope, schema_url, spans in scopes.values()
    )
    resource = _attributes(b"\x0a", message["resource"], None, None)[0]
    schema_url = message.get("resource_schema_url") or ""
    resource_spans = (
        _field(b"\x0a", resource)
        + scope_spans
        + (_text(b"\x1a", schema_url) if schema_url else b"")
    )
    return _field(b"\x0a", resource_spans)

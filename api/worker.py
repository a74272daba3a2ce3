"""The gunicorn worker: uvicorn's, except that a response leaves in one write.

uvicorn writes a response's head and its body with two send() calls. A replica that is
killed between the two leaves nginx with a head and no body; nginx has already passed the
head to the client, so it cannot try the next replica, and the client's request fails
(seen in tests/test_stack.py about once in ten kills under load). Written together, either
nothing has left the process, and nginx retries elsewhere, or all of it has, and the
kernel delivers it even after the process is gone. It costs nothing measurable
(docs/BENCHMARKS.md, session 8).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker


class CoalescingTransport(asyncio.Transport):
    """Holds a response's head until the next write and hands both to the real transport
    as one; a head that nothing follows in the same turn of the event loop (HEAD, a
    stream whose first chunk is not ready) goes at the end of that turn. Everything else
    goes straight through.

    Starlette writes a response's head and body back to back, with nothing in between
    that waits, so a response leaves as one send() as soon as its body is written: no
    later than before, and never as a head alone. "Whole or not at all" holds for what
    the kernel takes in one send(): a body larger than the socket's free send buffer is
    partly held in the process, as it always was."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:  # uvicorn writes an empty chunk as nothing: it must not free the head
            return
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
        # uvicorn's status line; not "100 Continue", which the client waits for alone.
        elif data[:9] == b"HTTP/1.1 " and data[9:10] != b"1":
            self._held = bytes(data)
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        """At the end of the turn, or before a close: the held head, if any."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # a no-op when it is the call running now
            self._flush_handle = None
        held, self._held = self._held, None
        # Not after a close: the peer is gone, or close() already sent it.
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._flush()  # only its pending call: nothing is held
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


class WholeResponseProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) writing through a CoalescingTransport."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        real = cast(asyncio.Transport, transport)
        super().connection_made(CoalescingTransport(real, asyncio.get_running_loop()))


class Worker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "http": WholeResponseProtocol,
    }

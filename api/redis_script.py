"""One Lua script called on the event loop, for the cached path's single Redis round trip.

In a profile, redis-py's asyncio client took about a third of a cached answer's CPU on
that call (docs/BENCHMARKS.md): command packing, a retry wrapper, a connection pool with
health checks, stream readers and their timers. Here a call is one write of
pre-built RESP bytes on an asyncio protocol and one reply parsed by hiredis, the C parser
redis-py itself uses. Everything else in the service still goes through redis-py.

What it does and does not do:
- URLs as redis-py reads them (`redis_url` is shared, and parsed by redis-py): TCP, TLS
  (`rediss://`, with the URL's ssl_* options), Unix sockets, username/password (AUTH) and
  database (SELECT) on connect;
- EVALSHA, and EVAL once when the server does not know the script (NOSCRIPT);
- one call at a time per connection, idle connections kept for the next call; a call
  that fails or is cancelled closes its connection, so a late reply can never be read
  as another call's;
- errors are redis-py's (ConnectionError, ResponseError), so callers handle one family.
  Deadlines are the caller's (`asyncio.timeout`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
from typing import Any, cast

import hiredis
import redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url


def pack(*args: bytes) -> bytes:
    """A command in RESP, the way every Redis client sends one."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiter: asyncio.Future[Any] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio's without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            waiter, self._waiter = self._waiter, None
            if waiter is None or waiter.done():  # a reply nobody asked for: unusable
                self.close()
                return
            waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(redis.ConnectionError(f"connection lost: {exc or 'closed'}"))

    async def call(self, command: bytes) -> Any:
        assert self.transport is not None and self._waiter is None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(command)
        return await waiter  # an error reply is returned, not raised

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _ok(reply: Any) -> None:
    if isinstance(reply, hiredis.ReplyError):
        raise redis.ResponseError(str(reply))


class ScriptCaller:
    """Calls one Lua script. Connections are opened on first use, inside the loop that
    uses them (a worker's), and closed by `aclose`."""

    def __init__(self, url: str, script: str, connect_timeout: float) -> None:
        self._options: dict[str, Any] = dict(parse_url(url))
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []

    async def __call__(self, keys: list[bytes], args: list[bytes]) -> Any:
        connection, reused = await self._acquire()
        try:
            return await self._call(connection, keys, args)
        except redis.ConnectionError:
            if not reused:
                raise
        # Idle connections go stale when Redis restarts: drop them all and retry once on
        # a new one, as redis-py does. The script is safe to run twice.
        await self.aclose()
        connection, _ = await self._acquire()
        return await self._call(connection, keys, args)

    async def _call(self, connection: _Connection, keys: list[bytes], args: list[bytes]) -> Any:
        counts = (str(len(keys)).encode(), *keys, *args)
        try:
            reply = await connection.call(pack(b"EVALSHA", self._sha, *counts))
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                # The server has not seen the script (a restart, a flush): EVAL loads it.
                reply = await connection.call(pack(b"EVAL", self._script, *counts))
        except BaseException:
            connection.close()  # mid-call: its reply, if one comes, belongs to no one
            raise
        self._idle.append(connection)  # a whole reply was read: in step for the next call
        _ok(reply)
        return reply

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection, and whether it was idle (True) or is new."""
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection, True
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await self._connect(), False
        except (OSError, TimeoutError) as exc:
            raise redis.ConnectionError(f"cannot connect to redis: {exc!r}") from exc

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        options = self._options
        kind = options.get("connection_class")
        if kind is UnixDomainSocketConnection:
            _, connection = await loop.create_unix_connection(_Connection, options["path"])
        else:
            context = self._tls if kind is SSLConnection else None
            _, connection = await loop.create_connection(
                _Connection,
                options.get("host", "localhost"),
                options.get("port", 6379),
                ssl=context,
            )
        try:
            password = options.get("password")
            if password is not None:
                user = options.get("username")
                credentials = (user.encode(),) if user else ()
                _ok(await connection.call(pack(b"AUTH", *credentials, password.encode())))
            if options.get("db"):
                _ok(await connection.call(pack(b"SELECT", str(options["db"]).encode())))
        except BaseException:
            connection.close()
            raise
        return connection

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext:
        """The TLS context redis-py itself would build from the URL's ssl_* options
        (certificate checks, CA, client certificate): made by its own connection class,
        which connects nothing until asked. Once: loading certificates takes ~20 ms."""
        options: dict[str, Any] = {k: v for k, v in self._options.items() if k.startswith("ssl_")}
        return SSLConnection(**options).ssl_context.get()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()

"""The cached path's Redis call (api/redis_script.py) against a real redis-server: the
URL forms the service accepts, a server that forgot the script, a call cut short by its
deadline, and a Redis that goes away and comes back."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest
import redis

from api.redis_script import ScriptCaller
from tests.servers import RedisServer, wait_until

ECHO = "redis.call('SET', KEYS[1], ARGV[1]) return {KEYS[1], ARGV[1]}"
# Busy for ~0.3 s inside Redis (DEBUG SLEEP is disabled by default), then answers.
SLOW = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > 300000 then break end
end
return ARGV[1]
"""
PICKY = "if ARGV[1] == 'fail' then return redis.error_reply('boom') end return ARGV[1]"


def _clients(redis_server: RedisServer) -> int:
    with redis.Redis(port=redis_server.port) as admin:
        return int(admin.info("clients")["connected_clients"])


def test_password_and_database_from_the_url(redis_server: RedisServer) -> None:
    admin = redis.Redis(port=redis_server.port)
    admin.config_set("requirepass", "s3cret/with:odd@chars")
    secured = redis.Redis(port=redis_server.port, password="s3cret/with:odd@chars", db=3)
    url = f"redis://:s3cret%2Fwith%3Aodd%40chars@127.0.0.1:{redis_server.port}/3"

    async def calls() -> list[object]:
        caller = ScriptCaller(url, ECHO, connect_timeout=2)
        try:
            first = await caller([b"k"], [b"one"])
            second = await caller([b"k"], [b"two"])  # the same connection, reused
            return [first, second]
        finally:
            await caller.aclose()

    assert asyncio.run(calls()) == [[b"k", b"one"], [b"k", b"two"]]
    assert secured.get("k") == b"two"  # written in database 3, not 0
    assert not redis.Redis(port=redis_server.port, password="s3cret/with:odd@chars").exists("k")

    async def wrong() -> None:
        caller = ScriptCaller(f"redis://:nope@127.0.0.1:{redis_server.port}/0", ECHO, 2)
        await caller([b"k"], [b"x"])

    with pytest.raises(redis.ResponseError, match="WRONGPASS"):
        asyncio.run(wrong())


def test_a_server_that_forgot_the_script_still_answers(redis_server: RedisServer) -> None:
    async def calls() -> list[object]:
        caller = ScriptCaller(redis_server.url, ECHO, connect_timeout=2)
        first = await caller([b"k"], [b"one"])
        redis.Redis(port=redis_server.port).script_flush()  # as after a restart
        second = await caller([b"k"], [b"two"])
        await caller.aclose()
        return [first, second]

    assert asyncio.run(calls()) == [[b"k", b"one"], [b"k", b"two"]]


def test_a_call_cut_short_never_lends_its_reply_to_the_next(redis_server: RedisServer) -> None:
    async def calls() -> tuple[object, object]:
        slow = ScriptCaller(redis_server.url, SLOW, connect_timeout=2)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await slow([], [b"late"])
        # The late reply would arrive on the cancelled call's connection: it is closed,
        # not kept for the next call.
        assert slow._idle == []
        # Redis finishes the script and sees the close: the admin connection is left.
        for _ in range(200):
            if _clients(redis_server) == 1:
                break
            await asyncio.sleep(0.05)
        assert _clients(redis_server) == 1
        after = await slow([], [b"mine"])
        # An error reply leaves its connection in step: the next call on it is answered.
        picky = ScriptCaller(redis_server.url, PICKY, connect_timeout=2)
        with pytest.raises(redis.ResponseError, match="boom"):
            await picky([], [b"fail"])
        still = await picky([], [b"fine"])
        await picky.aclose()
        await slow.aclose()
        return after, still

    assert asyncio.run(calls()) == (b"mine", b"fine")


def test_redis_going_away_is_a_connection_error_and_its_return_is_found(
    redis_server: RedisServer,
) -> None:
    async def calls() -> object:
        caller = ScriptCaller(redis_server.url, ECHO, connect_timeout=2)
        await caller([b"k"], [b"before"])
        redis_server.kill()
        with pytest.raises(redis.ConnectionError):
            await caller([b"k"], [b"during"])
        redis_server.start()  # the same port
        found = await caller([b"k"], [b"after"])
        await caller.aclose()
        return found

    assert asyncio.run(calls()) == [b"k", b"after"]


def test_an_idle_connection_gone_stale_is_retried_once(redis_server: RedisServer) -> None:
    """Redis restarted between two calls: the idle connection is dead, and the call
    succeeds on a new one instead of failing the cache."""

    async def calls() -> object:
        caller = ScriptCaller(redis_server.url, ECHO, connect_timeout=2)
        await caller([b"k"], [b"before"])
        redis_server.kill()
        redis_server.start()
        found = await caller([b"k"], [b"after"])
        await caller.aclose()
        return found

    assert asyncio.run(calls()) == [b"k", b"after"]


def test_a_unix_socket_and_an_acl_user(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(path.exists, 10, "redis-server's socket")
        admin = redis.Redis(unix_socket_path=str(path))
        wait_until(lambda: bool(admin.ping()), 10, "redis-server")
        admin.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all")

        async def call() -> object:
            caller = ScriptCaller(f"unix://alice:pw@{path}?db=2", ECHO, connect_timeout=2)
            try:
                return await caller([b"k"], [b"v"])
            finally:
                await caller.aclose()

        assert asyncio.run(call()) == [b"k", b"v"]
        assert redis.Redis(unix_socket_path=str(path), db=2).get("k") == b"v"
    finally:
        process.kill()
        process.wait()


def test_tls_is_configured_from_the_url_as_redis_py_does() -> None:
    strict = ScriptCaller("rediss://cache.internal:6380/0", ECHO, connect_timeout=1)._tls
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    lax = ScriptCaller("rediss://cache.internal:6380/0?ssl_cert_reqs=none", ECHO, 1)._tls
    assert lax.verify_mode == ssl.CERT_NONE and not lax.check_hostname

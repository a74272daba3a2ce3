"""The gunicorn worker class (api/worker.py) under real gunicorn: a response leaves the
process whole or not at all, so nginx can send a request whose replica died to the next."""

from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.worker import CoalescingTransport
from tests.servers import Process, free_port

# A worker killed between its response's head and body, as SIGKILL (the OOM killer, a
# node going) can do; plus a normal answer and a slow stream to show nothing else changed.
APP = textwrap.dedent(
    """
    import asyncio, os, signal

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        if path == "/killed-after-head":
            os.kill(os.getpid(), signal.SIGKILL)
        if path == "/stream":
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await asyncio.sleep(1.5)
        await send({"type": "http.response.body", "body": b"whole"})
    """
)


@pytest.fixture(params=["api.worker.Worker", "uvicorn_worker.UvicornWorker"])
def gunicorn(request: pytest.FixtureRequest, tmp_path: Path):
    (tmp_path / "dying_app.py").write_text(APP)
    port = free_port()
    server = Process(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--worker-class",
            request.param,
            "--workers",
            "1",
            "--bind",
            f"127.0.0.1:{port}",
            "--chdir",
            str(tmp_path),
            "dying_app:app",
        ],
        tmp_path / "gunicorn.log",
    )
    server.start()
    server.ready(
        lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200,
        60,
        "gunicorn",
    )
    yield request.param, port
    server.stop()


def _raw(port: int, request: bytes, timeout: float = 20) -> bytes:
    """Everything the server sends on one connection until it closes it."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        while chunk := conn.recv(65536):
            received += chunk
    return received


def test_a_worker_killed_mid_response_sends_nothing(gunicorn):
    worker_class, port = gunicorn
    received = _raw(port, b"GET /killed-after-head HTTP/1.1\r\nHost: t\r\n\r\n")
    if worker_class == "api.worker.Worker":
        assert received == b""  # to nginx: a failed try, which goes to the next replica
    else:  # the control: uvicorn's own worker had already sent the head
        assert received.startswith(b"HTTP/1.1 200"), received


def test_answers_and_streams_are_unchanged(gunicorn):
    _, port = gunicorn
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    # Two requests on one connection, then one that asks to close: each answered whole.
    received = _raw(
        port, request * 2 + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    )
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert received.count(b"whole") == 3
    assert received.endswith(b"0\r\n\r\n")  # the last chunk came before the close

    # A stream's first chunk arrives while the rest is still being made.
    with httpx.stream("GET", f"http://127.0.0.1:{port}/stream", timeout=10) as response:
        start = time.monotonic()
        chunks = [(time.monotonic() - start, chunk) for chunk in response.iter_raw()]
    assert b"".join(chunk for _, chunk in chunks) == b"firstwhole"
    assert chunks[0][1] == b"first" and chunks[0][0] < 1.0, chunks


class _Recording(asyncio.Transport):
    """What reaches the socket, one entry per write: the logic around it, not the proof
    (that is the gunicorn test above)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


def test_the_transport_joins_a_head_to_what_follows_it():
    async def scenario() -> list[list[bytes]]:
        seen = []
        real = _Recording()
        wrapped = CoalescingTransport(real, asyncio.get_running_loop())
        # A whole response: one write, at once, not at the end of the turn.
        wrapped.write(HEAD)
        wrapped.write(b"")  # an empty chunk frees nothing
        assert real.writes == []
        wrapped.write(b"whole")
        seen.append(list(real.writes))
        # A head alone (HEAD, a stream not yet ready) goes at the end of the turn.
        real.writes.clear()
        wrapped.write(HEAD)
        assert real.writes == []
        await asyncio.sleep(0)
        seen.append(list(real.writes))
        # Chunks after the head, and 100 Continue, go straight through.
        real.writes.clear()
        wrapped.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        wrapped.write(b"chunk")
        seen.append(list(real.writes))
        # close() sends a held head first; abort() drops it.
        real.writes.clear()
        wrapped.write(HEAD)
        wrapped.close()
        seen.append(list(real.writes))
        real.closed = False
        real.writes.clear()
        wrapped.write(HEAD)
        wrapped.abort()
        await asyncio.sleep(0)
        seen.append(list(real.writes))
        return seen

    assert asyncio.run(scenario()) == [
        [HEAD + b"whole"],
        [HEAD],
        [b"HTTP/1.1 100 Continue\r\n\r\n", b"chunk"],
        [HEAD],
        [],
    ]

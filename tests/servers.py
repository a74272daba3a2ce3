"""Real servers for the tests: started on free loopback ports, time-bounded, always stopped."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from deployment.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _listening_range() -> range:
    """Ports below the kernel's ephemeral range: it never gives those to an outgoing
    connection on its own. A port picked from the ephemeral range (what binding port 0
    gives) can become the local end of some client's connection (a test's, nginx's to a
    replica, Prometheus's scrapes) between the pick and the server's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return range(10000, low) if low - 10000 >= 2000 else range(0)


_handed_out: set[int] = set()


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive ports nothing listens on, none handed out before
    by this process, outside the ephemeral range when the machine leaves room for it."""
    candidates = _listening_range()
    for _ in range(200):
        if not candidates:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                base: int = sock.getsockname()[1]
        else:
            base = random.randrange(candidates.start, candidates.stop - count)
        ports = range(base, base + count)
        if _handed_out.intersection(ports):
            continue
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.update(ports)
        return base
    raise RuntimeError(f"no run of {count} free ports")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class Process:
    """A child process in its own process group, so stopping it stops its children too."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        inherit_env: bool = True,
    ) -> None:
        self.argv, self.log_path, self.cwd = argv, log, cwd
        self.env = {**(os.environ if inherit_env else {}), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()

    def ready(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for `check`; a process that never gets there is stopped, not leaked."""
        try:
            wait_until(check, timeout, what)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"{what} did not start:\n{self.output()[-3000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """The whole process group, even if its leader has just exited (what it started
        may not have). Not once it was reaped by an earlier stop or check: with 32768 pids,
        an emptied group's id can soon be another process's."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):  # stragglers in the group
            os.killpg(self.proc.pid, signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets and data but answers nothing."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class RedisServer(Process):
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: `make test` installs it (make system-deps)"
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            workdir / "redis.log",
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        super().start()

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        self.ready(ping, 10, "redis-server")


class LlamaServer(Process):
    """llama.cpp's OpenAI-compatible server with the real SmolLM2 GGUF, started the way
    `python -m api serve` starts it."""

    def __init__(self, workdir: Path, alias: str = "smollm2-135m-instruct") -> None:
        from api.config import Settings
        from api.runner import llm_server_command, local_model_path

        self.port = free_port()
        self.model = local_model_path()
        workdir.mkdir(parents=True, exist_ok=True)
        settings = Settings(llm_port=self.port, llm_model=alias)
        # As in api/runner.py: llama_cpp.server would take PORT etc. from our environment.
        super().__init__(
            llm_server_command(settings, self.model),
            workdir / "llama.log",
            env={"PATH": os.environ["PATH"]},
            inherit_env=False,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        super().start()
        url = f"{self.base_url}/models"
        self.ready(lambda: httpx.get(url, timeout=1).status_code == 200, 120, "llama server")

    def cpu_ticks(self) -> int:
        """CPU time used so far (user + system, in clock ticks): shows whether it is working."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])


class ChromaServer(Process):
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [
                str(VENV_BIN / "chroma"),
                "run",
                "--path",
                str(workdir / "db"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            workdir / "chroma.log",
            env={"ANONYMIZED_TELEMETRY": "False"},
        )

    def start(self) -> None:
        super().start()
        url = f"http://127.0.0.1:{self.port}/api/v2/heartbeat"
        self.ready(lambda: httpx.get(url, timeout=1).status_code == 200, 60, "chroma run")


class ApiServer(Process):
    """`python -m api serve` on a free port, with this checkout's model and sample corpus;
    `env` overrides. `start` returns once /ready answers 200."""

    def __init__(self, workdir: Path, name: str = "api", **env: str) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [sys.executable, "-m", "api", "serve"],
            workdir / f"{name}.log",
            cwd=ROOT,
            env={
                "PORT": str(self.port),
                "DATA_DIR": str(workdir / "data"),
                "MODEL_DIR": str(ROOT / "models"),
                "DOCUMENTS_DIR": str(ROOT / "documents"),
                "CHROMA_COLLECTION_PREFIX": name,
                "LLM_PORT": str(free_port()),
                **env,
            },
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """The runner puts gunicorn and the LLM in process groups of their own: whatever of
        its tree outlives it (a drain longer than `timeout`) is killed here, not left
        holding ports and CPU for the tests after."""
        tree = descendants(self.proc.pid) if self.proc and self.proc.poll() is None else []
        super().stop(sig, timeout)
        deadline = time.monotonic() + timeout
        while (alive := [p for p in tree if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def start(self, timeout: float = 180) -> None:
        super().start()
        self.ready(
            lambda: httpx.get(f"{self.base}/ready", timeout=2).status_code == 200,
            timeout,
            f"api server {self.log_path.stem}",
        )


def parent(pid: int) -> int:
    """`pid`'s parent, from /proc (OSError if it is gone)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _parents() -> dict[int, int]:
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                found[int(entry.name)] = parent(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    return [child for child, of in _parents().items() if of == pid]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, by ancestry in /proc."""
    parents = _parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        frontier = [child for child, of in parents.items() if of in frontier]
        found += frontier
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


_STACK_PORTS = (
    "NGINX_PORT",
    "NGINX_STATUS_PORT",
    "REDIS_PORT",
    "CHROMA_PORT",
    "LLM_PORT",
    "PROMETHEUS_PORT",
    "NGINX_EXPORTER_PORT",
    "REDIS_EXPORTER_PORT",
)


def stack_on_free_ports(stack_dir: Path, replicas: int, workers: int) -> Topology:
    """`make stack`'s topology with every port free on this machine (the replicas' in a
    row, as the topology numbers them), its state under `stack_dir`."""
    from deployment.topology import Topology

    return Topology.from_env(
        {
            "STACK_DIR": str(stack_dir),
            "REPLICAS": str(replicas),
            "WEB_CONCURRENCY": str(workers),
            "API_PORT": str(free_port(replicas)),
            **{name: str(free_port()) for name in _STACK_PORTS},
        }
    )


def route_count(topology: Topology, route: str) -> dict[str, float]:
    """Each replica's own count of requests to `route` (by its route template)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for index, name in enumerate(topology.replica_names(), start=1):
        text = httpx.get(f"http://127.0.0.1:{topology.replica_port(index)}/metrics").text
        counts[name] = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "http_server_request_duration_seconds_count"
            and sample.labels.get("http_route") == route
        )
    return counts


class RefusingProxy:
    """A forward proxy that helps no one: it answers every request with 502 and keeps the
    request lines it was sent, so a test can show nothing was routed through it."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._sock.close()
        self._thread.join(5)

    def environment(self) -> dict[str, str]:
        """Every proxy variable pointing here, and no exemptions of the caller's own."""
        names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
        return {
            **dict.fromkeys(names, self.url),
            **{name.lower(): self.url for name in names},
            "NO_PROXY": "",
            "no_proxy": "",
        }

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1"))
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")

"""`make oom`: at what load does a memory-limited replica get OOM-killed?

One replica — gunicorn with WEB_CONCURRENCY uvicorn workers, the production config — runs
inside a child of this process's cgroup v1 memory group, with `memory.limit_in_bytes` set
(as `deploy.resources.limits.memory` would in compose). Its Chroma server runs outside the
limit. The load ramps in stages, each more concurrent and with bigger payloads (ingest
batches of more and longer documents, long questions, many sources), until the kernel's OOM
killer strikes or the group's memory crosses 85% of the limit.

Under gunicorn an OOM kill takes a worker, not the replica: the master logs "was sent
SIGKILL! Perhaps out of memory?" and starts another, so a container would not exit 137.
Kills are therefore read from the cgroup's own counter (`oom_kill` in memory.oom_control)
and from gunicorn's log. The report (oom.json and index.html in
loadtest/reports/oom-<time>/, linked from loadtest/reports/oom-latest) gives the breaking
stage, the peak memory per worker and for the group, and a recommended limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from api.runner import gunicorn_command
from loadtest import arguments

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MIB = 1024 * 1024
THRESHOLD = 0.85
KILL_LINE = "Perhaps out of memory?"


class OomError(RuntimeError):
    pass


class _Tail:
    """Whether `needle` has appeared in a growing file, reading only what was added since
    the last look: the replica's log grows by a line per request, and rereading all of
    it five times a second would load the machine under measurement."""

    def __init__(self, path: Path, needle: bytes) -> None:
        self._path, self._needle = path, needle
        self._offset, self._carry, self._seen = 0, b"", False

    def seen(self) -> bool:
        if self._seen:
            return True
        with self._path.open("rb") as f:
            f.seek(self._offset)
            chunk = self._carry + f.read()
            self._offset = f.tell()
        self._carry = chunk[-(len(self._needle) - 1) :]  # a needle split across two reads
        self._seen = self._needle in chunk
        return self._seen


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the cgroup
class MemoryGroup:
    """A child memory cgroup (v1) of the one this process runs in."""

    def __init__(self, limit_bytes: int) -> None:
        own = next(
            (
                line.split(":", 2)[2]
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] == "memory"
            ),
            None,
        )
        if own is None or not CGROUP_ROOT.is_dir():
            raise OomError("no cgroup v1 memory controller here (/sys/fs/cgroup/memory)")
        self.path = CGROUP_ROOT / own.lstrip("/") / f"rag-oom-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        except OSError as exc:
            raise OomError(f"cannot create a memory cgroup at {self.path}: {exc}") from None
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def usage(self) -> int:
        """The working set: usage less the page cache the kernel can drop at once (as
        cAdvisor and the kubelet count it). Raw usage includes the model files and logs
        the replica has read or written, which would trip the 85% mark early."""
        stat = {
            key: int(value)
            for key, value in (line.split() for line in self._read("memory.stat").splitlines())
        }
        raw = int(self._read("memory.usage_in_bytes"))
        return max(0, raw - stat.get("total_inactive_file", 0))

    def oom_kills(self) -> int:
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0  # kernels before 4.13 have no counter: gunicorn's log line still tells

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def join(self) -> None:
        """Called in the child between fork and exec: the replica starts inside."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


# --- the load
@dataclass
class Stage:
    number: int
    clients: int
    documents_per_upload: int
    document_chars: int
    question_chars: int
    max_sources: int
    requests: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    peak_group_bytes: int = 0
    peak_worker_rss: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def stages(count: int) -> list[Stage]:
    """Each stage adds a client, ten documents per upload, longer documents, longer
    questions and more sources."""
    return [
        Stage(
            number=k,
            clients=min(k + 1, 16),
            # Toward the API's limits (100 documents, a 20 MB body): a request's memory is
            # taken when its body is parsed and held until its last chunk is embedded.
            documents_per_upload=min(10 * k, 100),
            document_chars=min(25_000 * k, 190_000),
            question_chars=min(250 * k, 2000),
            max_sources=min(3 * k, 20),
        )
        for k in range(1, count + 1)
    ]


_WORDS = (
    "replica cache latency budget rollback shard index vector corpus worker memory "
    "limit queue retry deploy alert backup restore drill token stream nginx chroma redis"
).split()


def _text(chars: int, seed: str) -> str:
    words, size, i = [seed], len(seed), 0
    while size < chars:
        word = _WORDS[(i * 7 + len(seed)) % len(_WORDS)]
        words.append(word)
        size += len(word) + 1
        i += 1
    return " ".join(words)[:chars]


def _client(base: str, stage: Stage, stop: threading.Event, lock: threading.Lock) -> None:
    with httpx.Client(base_url=base, timeout=300) as http:
        n = 0
        while not stop.is_set():
            n += 1
            tag = uuid.uuid4().hex
            try:
                if n % 2:
                    docs = [
                        {
                            "text": _text(stage.document_chars, f"{tag}-{i}"),
                            "source": f"oom-{tag}-{i}.txt",
                        }
                        for i in range(stage.documents_per_upload)
                    ]
                    response = http.post("/documents", json={"documents": docs})
                else:
                    question = _text(stage.question_chars, f"what about {tag}")
                    response = http.post(
                        "/query", json={"question": question, "max_sources": stage.max_sources}
                    )
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__  # e.g. a worker killed mid-request
            with lock:
                stage.requests += 1
                stage.errors += not outcome.startswith(("2", "4"))
                stage.statuses[outcome] = stage.statuses.get(outcome, 0) + 1


# --- the run
def _start_replica(
    group: MemoryGroup, workdir: Path, workers: int, chroma_port: int
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = _free_port()
    metrics = workdir / "metrics"
    metrics.mkdir()
    log = workdir / "replica.log"
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": str(workers),
        "CHROMA_HOST": "127.0.0.1",
        "CHROMA_PORT": str(chroma_port),
        "CHROMA_COLLECTION_PREFIX": f"oom{uuid.uuid4().hex[:8]}",
        "GENERATOR": "extractive",  # the replica's own memory, not an LLM's
        "INGEST_ON_START": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "OTEL_SDK_DISABLED": "true",
        # Empty, not unset: unset, the replica would take REDIS_URL from a .env file.
        "REDIS_URL": "",
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            gunicorn_command(),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=group.join,  # noqa: PLW1509 - must run in the child before exec
            start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}", log


def _wait_ready(base: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def find(
    limit_bytes: int,
    *,
    workers: int = 2,
    stage_seconds: float = 8.0,
    max_stages: int = 8,
    keep: bool = False,
    until_kill: bool = False,
) -> dict[str, Any]:
    """`until_kill`: do not stop at 85% of the limit, go on until the OOM killer strikes.
    `keep`: leave the replica's log and data in the work directory (named in the result)."""
    group = MemoryGroup(limit_bytes)  # first: it is what fails on a host without cgroup v1
    workdir = Path(tempfile.mkdtemp(prefix="rag-oom-"))
    chroma: subprocess.Popen[bytes] | None = None
    replica: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, int]] = []
    try:
        chroma_port = _free_port()
        chroma = subprocess.Popen(
            [
                "env",
                "-i",
                f"PATH={os.environ['PATH']}",
                "ANONYMIZED_TELEMETRY=False",
                str(Path(sys.executable).parent / "chroma"),
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                str(chroma_port),
                "--path",
                str(workdir / "chroma"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        replica, base, log = _start_replica(group, workdir, workers, chroma_port)
        if not _wait_ready(base, 180):
            raise OomError(
                f"the replica did not become ready under a {limit_bytes // MIB} MiB limit:\n"
                + log.read_text(errors="replace")[-2000:]
            )
        baseline = group.usage()
        kills_before = group.oom_kills()
        started = time.monotonic()
        killed_line = _Tail(log, KILL_LINE.encode())
        done: list[Stage] = []
        outcome, breaking = "no break", None
        for stage in stages(max_stages):
            stop, lock = threading.Event(), threading.Lock()
            threads = [
                threading.Thread(target=_client, args=(base, stage, stop, lock), daemon=True)
                for _ in range(stage.clients)
            ]
            for t in threads:
                t.start()
            stage_start = time.monotonic()
            reason = None
            while time.monotonic() - stage_start < stage_seconds and reason is None:
                usage = group.usage()  # sampled every 0.2 s: a shorter spike can slip by
                samples.append((time.monotonic() - started, usage))
                stage.peak_group_bytes = max(stage.peak_group_bytes, usage)
                master = replica.pid
                for pid in group.pids():
                    if pid != master and _parent(pid) == master:
                        key = str(pid)
                        stage.peak_worker_rss[key] = max(
                            stage.peak_worker_rss.get(key, 0), _rss(pid)
                        )
                if group.oom_kills() > kills_before or killed_line.seen():
                    reason = "oom kill"
                elif usage >= THRESHOLD * group.limit and not until_kill:
                    reason = f"memory above {THRESHOLD:.0%} of the limit"
                time.sleep(0.2)
            # No new requests; those in flight run on, as a real client's would, and keep
            # their memory, so load piles up from stage to stage as it does in an overload.
            stop.set()
            stage.seconds = round(time.monotonic() - stage_start, 2)
            done.append(stage)
            if reason is not None:
                outcome, breaking = reason, stage
                break
        recovered = _wait_ready(base, 120)
        kills = group.oom_kills() - kills_before
        logged = log.read_text(errors="replace").count(KILL_LINE)
    finally:
        if replica is not None and replica.poll() is None:
            os.killpg(replica.pid, signal.SIGTERM)
            try:
                replica.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(replica.pid, signal.SIGKILL)
        group.remove()
        if chroma is not None:
            chroma.terminate()
            chroma.wait(30)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    safe = [s for s in done if s is not breaking]
    worker_peak = max((v for s in done for v in s.peak_worker_rss.values()), default=0)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "workdir": str(workdir) if keep else None,
        "limit_bytes": group.limit,
        "workers": workers,
        "baseline_bytes": baseline,
        "outcome": outcome,
        "breaking_stage": asdict(breaking) if breaking else None,
        "last_safe_stage": asdict(safe[-1]) if safe else None,
        "oom_kills": kills,
        "gunicorn_kill_lines": logged,
        "recovered": recovered,
        "peak_worker_rss_bytes": worker_peak,
        "recommended_limit_bytes": recommended_limit([s.peak_group_bytes for s in safe]),
        "stages": [asdict(s) for s in done],
        "samples": samples,
    }


def recommended_limit(held: list[int]) -> int | None:
    """What the stages that held needed at most, with 30% headroom, rounded up to 64 MiB;
    None if none held: the idle figure alone would recommend a limit sized for no load."""
    if not held:
        return None
    return math.ceil(max(held) * 1.3 / (64 * MIB)) * 64 * MIB


def _recommendation(result: dict[str, Any]) -> str:
    limit = result["recommended_limit_bytes"]
    if limit is None:
        return "none: no stage held under this limit; raise LIMIT and run again"
    return f"{limit // MIB} MiB"


def write(result: dict[str, Any], out: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    directory = out / f"oom-{stamp}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oom.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if result["samples"]:
        xs, ys = zip(*result["samples"], strict=True)
        ax.plot(xs, [y / MIB for y in ys], label="cgroup memory")
    ax.axhline(result["limit_bytes"] / MIB, color="red", label="limit")
    ax.axhline(result["limit_bytes"] * THRESHOLD / MIB, color="orange", linestyle=":", label="85%")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(f"Replica memory under ramping load: {result['outcome']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "memory.png", dpi=100)
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{s['number']}</td><td>{s['clients']}</td><td>{s['documents_per_upload']}</td>"
        f"<td>{s['document_chars']}</td><td>{s['question_chars']}</td><td>{s['max_sources']}</td>"
        f"<td>{s['requests']}</td><td>{s['errors']}</td><td>{s['peak_group_bytes'] // MIB}</td>"
        f"<td>{max(s['peak_worker_rss'].values(), default=0) // MIB}</td></tr>"
        for s in result["stages"]
    )
    (directory / "index.html").write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>OOM threshold</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:right}}</style>
</head><body><h1>OOM threshold: {result["outcome"]}</h1>
<p>Limit {result["limit_bytes"] // MIB} MiB, {result["workers"]} workers, idle
{result["baseline_bytes"] // MIB} MiB. OOM kills: {result["oom_kills"]} (gunicorn logged
{result["gunicorn_kill_lines"]}). Peak worker RSS {result["peak_worker_rss_bytes"] // MIB} MiB.
Recommended limit: <b>{_recommendation(result)}</b>.
Recovered afterwards: {result["recovered"]}.</p>
<table><tr><th>stage</th><th>clients</th><th>docs/upload</th><th>chars/doc</th>
<th>question chars</th><th>max_sources</th><th>requests</th><th>5xx/errors</th>
<th>peak group MiB</th><th>peak worker MiB</th></tr>{rows}</table>
<img src="memory.png" alt="memory over time"></body></html>
"""
    )
    latest = out / "oom-latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(directory.name)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.oom")
    parser.add_argument("--limit", default="1536M", help="memory limit, e.g. 1536M or 2G")
    parser.add_argument("--workers", type=arguments.positive_int, default=2)
    parser.add_argument("--stage-seconds", type=arguments.positive_seconds, default=10.0)
    parser.add_argument("--stages", type=arguments.positive_int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    parser.add_argument("--keep", action="store_true", help="keep the replica's log and data")
    parser.add_argument(
        "--until-kill",
        action="store_true",
        help="go past 85%% of the limit until a worker is OOM-killed",
    )
    args = parser.parse_args(argv)
    units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
    text = args.limit.strip().upper()
    try:
        limit = int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    except (ValueError, IndexError, OverflowError):
        limit = 0
    # cgroup v1 reads -1 as "no limit"; a limit below a page is no limit either.
    if limit < 4096:
        parser.error(f"--limit {args.limit!r}: expected bytes or a size like 1536M")
    try:
        result = find(
            limit,
            workers=args.workers,
            stage_seconds=args.stage_seconds,
            max_stages=args.stages,
            keep=args.keep,
            until_kill=args.until_kill,
        )
    except OomError as exc:
        print(f"oom: {exc}", file=sys.stderr)
        return 1
    directory = write(result, args.out)
    print(
        f"{result['outcome']} at stage "
        f"{(result['breaking_stage'] or {}).get('number', '-')}: oom kills {result['oom_kills']}, "
        f"peak worker RSS {result['peak_worker_rss_bytes'] // MIB} MiB, recommended limit "
        f"{_recommendation(result)}, recovered: {result['recovered']}\n"
        f"report: {directory}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

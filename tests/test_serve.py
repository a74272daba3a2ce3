"""The real entry points: `python -m api serve` under gunicorn, and the ingest CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import pytest

from api import processes
from tests.conftest import CORPUS_DIR, MODEL_DIR
from tests.servers import (
    ROOT,
    ApiServer,
    ChromaServer,
    RedisServer,
    children,
    cmdline,
    free_port,
    running,
    wait_until,
)


def serve(tmp_path: Path, name: str, **env: str) -> tuple[ApiServer, str]:
    server = ApiServer(tmp_path, name, **{"GENERATOR": "extractive", **env})
    server.start()
    return server, server.base


def test_first_start_serves_the_sample_corpus(tmp_path):
    """What a newcomer does after `make run`: one curl, an answer with sources, from the
    local LLM that `serve` starts beside gunicorn."""
    process, base = serve(tmp_path, "embedded", GENERATOR="openai", LLM_MAX_TOKENS="64")
    try:
        response = httpx.post(
            f"{base}/query", timeout=30, json={"question": "How do I restore a backup?"}
        )
        assert response.status_code == 200
        body = response.json()
        # `make run` answers with the local LLM (a 135M model: its wording is not asserted).
        assert body["generator"] == "openai" and body["answer"].strip()
        assert body["usage"]["completion_tokens"] > 0
        assert body["sources"][0]["document"] == "backup-and-restore.md"
        assert httpx.get(f"{base}/ready").json()["dependencies"]["llm"]["status"] == "ok"
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        # Malformed input does not take the worker down.
        bad = httpx.post(
            f"{base}/query", content=b"{", timeout=10, headers={"content-type": "application/json"}
        )
        assert bad.status_code == 422
        assert (
            httpx.post(f"{base}/query", json={"question": "backup?"}, timeout=60).status_code == 200
        )
    finally:
        process.stop()
    assert process.proc is not None and process.proc.returncode == 0, process.output()[-2000:]


def test_two_workers_share_a_chroma_server_and_redis(tmp_path, chroma_server: ChromaServer):
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    process, base = serve(
        tmp_path,
        "workers",
        WEB_CONCURRENCY="2",
        CHROMA_HOST="127.0.0.1",
        CHROMA_PORT=str(chroma_server.port),
        REDIS_URL=redis_server.url,
        INGEST_ON_START="false",
        LOG_FORMAT="json",
    )
    corpus = sorted(CORPUS_DIR.glob("*.md"))
    try:
        upload = [("files", (p.name, p.read_bytes(), "text/markdown")) for p in corpus]
        assert httpx.post(f"{base}/documents", files=upload, timeout=120).status_code == 200
        assert httpx.get(f"{base}/documents").json()["total"] == len(corpus)
        # Asked until both workers have answered (gunicorn does not spread requests
        # evenly): the model's answer is made once, in whichever worker came first, and
        # served to both from the shared cache.
        answers: list[httpx.Response] = []
        pids: set[int] = set()
        while len(pids) < 2 and len(answers) < 200:
            request_id = f"share-{len(answers)}"
            answers.append(
                httpx.post(
                    f"{base}/query",
                    json={"question": "What does least_conn do?"},
                    headers={"x-request-id": request_id},
                    timeout=30,
                )
            )
            wait_until(partial(_logged, process, request_id), 10, "the access line")
            pids = {
                line["pid"]
                for line in map(json.loads, _json_lines(process.output()))
                if line.get("logger") == "api.access" and line["request_id"].startswith("share-")
            }
        assert len(pids) == 2, "one worker answered every request"
        assert all(a.status_code == 200 for a in answers)
        assert [a.json()["cached"] for a in answers].count(False) == 1
        assert len({a.json()["answer"] for a in answers}) == 1
    finally:
        process.stop()
        redis_server.stop()
    assert process.output().count("Booting worker") == 2


def _logged(process: ApiServer, request_id: str) -> bool:
    return f'"request_id":"{request_id}"' in process.output()


def _json_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("{")]


def run_cli(*args: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "PATH": "/usr/bin:/bin",
            "DATA_DIR": str(data_dir),
            "MODEL_DIR": str(MODEL_DIR),
            **env,
        },
    )


LOOPBACK = "localhost,127.0.0.1,::1"


@pytest.mark.parametrize(
    ("given", "exempt"),
    [
        ({}, {}),  # no proxy: the environment is left as it is
        ({"HTTPS_PROXY": "http://proxy:3128"}, {"NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK}),
        (
            {"http_proxy": "http://proxy:3128", "NO_PROXY": "example.com, 127.0.0.1"},
            {"NO_PROXY": "example.com,127.0.0.1,localhost,::1", "no_proxy": LOOPBACK},
        ),
        ({"ALL_PROXY": "socks5://proxy", "no_proxy": "*"}, {"NO_PROXY": LOOPBACK, "no_proxy": "*"}),
    ],
)
def test_loopback_is_exempt_from_a_configured_proxy(given, exempt):
    env = dict(given)
    processes.loopback_without_proxy(env)
    assert {k: v for k, v in env.items() if k.lower() == "no_proxy"} == exempt
    assert {k: v for k, v in env.items() if k.lower() != "no_proxy"} == {
        k: v for k, v in given.items() if k.lower() != "no_proxy"
    }


def test_a_bad_setting_is_named_and_nothing_starts(tmp_path):
    run = run_cli("serve", data_dir=tmp_path, LOG_LEVEL="verbose", CHUNK_TOKENS="3")
    assert run.returncode == 2
    assert "LOG_LEVEL: Input should be 'debug'" in run.stderr
    assert "CHUNK_TOKENS: Input should be greater than or equal to 16" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "chroma").exists()


def test_cli_ingests_a_folder_idempotently(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted(CORPUS_DIR.glob("*.md"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 nope")
    first = run_cli("ingest", str(folder), data_dir=tmp_path / "data")
    assert first.returncode == 1  # one file failed, and it says which
    assert "3 created, 0 unchanged, 1 failed" in first.stdout
    assert "broken.pdf" in first.stderr and "ingest" in first.stderr  # the progress bar
    (folder / "broken.pdf").unlink()
    again = run_cli("ingest", str(folder), data_dir=tmp_path / "data")
    assert again.returncode == 0, again.stderr
    assert "0 created, 3 unchanged, 0 failed" in again.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (("ingest", "/nonexistent/path"), "no such file or directory"),
        (("ingest",), "the following arguments are required"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, args, message):
    run = run_cli(*args, data_dir=tmp_path / "data")
    assert run.returncode == 2 and message in run.stderr


def test_cli_refuses_an_embedded_store_held_by_a_server(tmp_path):
    process, _ = serve(tmp_path, "holder")
    try:
        run = run_cli("ingest", str(CORPUS_DIR), data_dir=tmp_path / "data")
    finally:
        process.stop()
    assert run.returncode == 1
    assert "in use by pid" in run.stderr


def test_workers_go_when_their_master_is_killed(tmp_path):
    """SIGKILL leaves gunicorn no time to stop its workers; left alone they would go on
    serving on the port, and a master started again could not bind it."""
    process, base = serve(tmp_path, "orphans")
    workers: list[int] = []
    try:
        assert process.proc is not None
        (master,) = [p for p in children(process.proc.pid) if b"gunicorn" in cmdline(p)]
        workers = [p for p in children(master) if b"gunicorn" in cmdline(p)]
        assert workers and httpx.get(f"{base}/health").status_code == 200
        os.kill(master, signal.SIGKILL)
        wait_until(lambda: not any(running(w) for w in workers), 60, "workers gone")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=5)
    finally:
        process.stop()
        for worker in filter(running, workers):  # if this test failed, it leaves no orphan
            os.kill(worker, signal.SIGKILL)


def test_a_reload_on_the_embedded_store_waits_for_the_old_worker(tmp_path):
    """HUP starts the new worker before the old one has finished its requests; the new
    one waits for the store's lock instead of failing, which would halt gunicorn."""
    process, base = serve(tmp_path, "reload", INGEST_ON_START="false")
    try:
        assert process.proc is not None
        (master,) = [p for p in children(process.proc.pid) if b"gunicorn" in cmdline(p)]
        (old,) = [p for p in children(master) if b"gunicorn" in cmdline(p)]
        # Hundreds of chunks to embed: the old worker is busy for seconds.
        text = " ".join(f"Line {i} of the long runbook about replica {i % 7}." for i in range(1500))
        result: list[httpx.Response] = []
        upload = threading.Thread(
            target=lambda: result.append(
                httpx.post(
                    f"{base}/documents",
                    json={"documents": [{"text": text, "source": "long.txt"}]},
                    timeout=300,
                )
            )
        )
        upload.start()
        wait_until(lambda: "Booting worker" in process.output(), 5, "booted")  # it was
        time.sleep(1)  # the upload is being embedded
        assert upload.is_alive()  # the old worker is busy with it as the reload begins
        os.kill(master, signal.SIGHUP)
        upload.join(timeout=300)
        assert result and result[0].status_code == 200, result
        wait_until(
            lambda: [p for p in children(master) if b"gunicorn" in cmdline(p)] not in ([], [old]),
            120,
            "the new worker",
        )
        wait_until(lambda: httpx.get(f"{base}/ready").status_code == 200, 120, "ready")
        listed = httpx.get(f"{base}/documents", timeout=30).json()
        assert [d["source"] for d in listed["documents"]] == ["long.txt"]
        assert not running(old) and process.alive()
    finally:
        process.stop()


def test_a_sigterm_while_the_local_llm_loads_stops_it_too(tmp_path):
    """The runner's handlers are in place before its first child starts: stopped while
    the LLM is still loading, it takes the LLM with it instead of leaving it on its port."""
    port = free_port()
    runner = subprocess.Popen(
        [sys.executable, "-m", "api", "serve"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DATA_DIR": str(tmp_path / "data"),
            "MODEL_DIR": str(MODEL_DIR),
            "PORT": str(free_port()),
            "LLM_PORT": str(port),
            "GENERATOR": "openai",
            "INGEST_ON_START": "false",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started: list[int] = []
    try:

        def llm_started() -> bool:  # its command line, once exec has replaced the fork's
            return any(b"llama_cpp.server" in cmdline(p) for p in children(runner.pid))

        wait_until(llm_started, 60, "the LLM started")
        started += children(runner.pid)
        (llm,) = started
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 0
        wait_until(lambda: not running(llm), 30, "the LLM gone")
    finally:
        runner.kill()
        runner.wait()
        for child in filter(running, started):  # if this test failed, it leaves no orphan
            os.kill(child, signal.SIGKILL)


def test_a_runner_killed_outright_takes_its_children_with_it(tmp_path):
    process, base = serve(tmp_path, "killed-runner")
    assert process.proc is not None
    kids = children(process.proc.pid)
    assert kids and httpx.get(f"{base}/health").status_code == 200
    try:
        os.kill(process.proc.pid, signal.SIGKILL)  # no handler runs: the kernel tells them
        wait_until(lambda: not any(map(running, kids)), 60, "gunicorn gone")
    finally:
        process.stop()
        for child in filter(running, kids):
            os.kill(child, signal.SIGKILL)

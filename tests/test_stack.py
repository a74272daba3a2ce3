"""The native production topology (`make stack`), started for real: supervisord running
redis-server, `chroma run`, llama.cpp, two gunicorn replicas, nginx, Prometheus and both
exporters, on free loopback ports under a temporary STACK_DIR."""

from __future__ import annotations

import configparser
import itertools
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis as redis_client

from api.config import get_settings
from deployment import stack as native
from deployment.topology import (
    MEMBER_ENV,
    Topology,
    nginx_values,
    render,
    render_template,
    replica_env,
)
from tests.servers import Process, descendants, route_count, stack_on_free_ports, wait_until

QUESTION = {"question": "How do I restore a backup?"}


def _load(url: str, seconds: float, clients: int, body: dict[str, str]) -> list[int]:
    """Closed-loop POSTs to /query; returns every status code (0 for a transport error)."""
    statuses: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        # As long as nginx waits for a replica (proxy_read_timeout): a slow answer while
        # the killed one boots again is slow, not lost.
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop:
                try:
                    status = http.post("/query", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_both_replicas_serve_under_concurrent_load(topology: Topology) -> None:
    httpx.post(f"{topology.url}/query", json=QUESTION, timeout=60)  # cached from here on
    before = route_count(topology, "/query")
    statuses = _load(topology.url, 5, 6, QUESTION)
    after = route_count(topology, "/query")
    served = {name: after[name] - before[name] for name in after}
    assert set(statuses) == {200}
    # Every request counted once, by the replica that served it, and both took a share.
    assert sum(served.values()) == len(statuses)
    assert all(count >= 0.2 * len(statuses) for count in served.values()), served


def _group_pids(topology: Topology, name: str) -> list[int]:
    """The replica's gunicorn master and everything under it."""
    master = int(native.supervisorctl(topology, "pid", name).strip())
    found = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                found.append(int(entry.name))
    return found


def test_a_replica_killed_mid_load_costs_no_request_and_comes_back(topology: Topology) -> None:
    httpx.post(f"{topology.url}/query", json=QUESTION, timeout=60)
    victims = _group_pids(topology, "api-1")
    assert len(victims) >= 2  # master and worker

    def kill() -> None:
        time.sleep(5)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        statuses = _load(topology.url, 20, 4, QUESTION)
        killer.join()
        assert len(statuses) > 100
        assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    finally:
        # supervisord starts a new master, which serves again; waited for even when the
        # assertions failed, so the tests after this one find the stack whole.
        killer.join()
        wait_until(lambda: _pid(topology, "api-1") not in (0, *victims), 60, "api-1 restarted")
        url = f"http://127.0.0.1:{topology.replica_port(1)}/ready"
        wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, 120, "api-1 ready again")


def _pid(topology: Topology, program: str) -> int:
    """The program's pid, 0 while it has none (or supervisorctl says something else)."""
    answer = native.supervisorctl(topology, "pid", program).strip()
    return int(answer) if answer.isdigit() else 0


def test_sse_through_nginx_arrives_token_by_token(topology: Topology) -> None:
    question = {"question": f"How is a deployment rolled back? ({uuid.uuid4().hex})"}
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream(
        "POST", f"{topology.url}/query", json={**question, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "event: token":
                arrivals.append(time.monotonic() - start)
            if line == "event: done":
                break
    assert len(arrivals) >= 5
    # Unbuffered: tokens arrive as the model makes them (SmolLM2 here: one every ~10 ms),
    # not together in one burst at the end, which is what a buffering proxy delivers.
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    assert gaps[len(gaps) // 2] > 0.003, arrivals
    assert arrivals[-1] - arrivals[0] > 0.003 * (len(arrivals) - 1), arrivals


def _nginx_entry(topology: Topology, request_id: str) -> dict[str, object]:
    """nginx's access line for a request (written when nginx finishes with it, which for
    a rejected upload is after it has drained the body)."""
    found: list[dict[str, object]] = []

    def logged() -> bool:
        lines = (topology.log_dir / "nginx-access.log").read_text().splitlines()
        found[:] = [json.loads(x) for x in lines if x.strip() and request_id in x]
        return bool(found)

    wait_until(logged, 10, f"nginx access line for {request_id}")
    assert len(found) == 1
    return found[0]


def test_the_edge_rejects_big_bodies_and_hides_metrics(topology: Topology) -> None:
    too_big = b'{"documents": [{"text": "' + b"x" * (21 * 1024 * 1024) + b'"}]}'
    response = httpx.post(
        f"{topology.url}/documents",
        content=too_big,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]
    request_id = response.headers["x-request-id"]
    line = _nginx_entry(topology, request_id)
    assert line["request_id"] == request_id
    assert line["upstream_addr"] == ""  # stopped at the edge, no replica saw it

    assert httpx.get(f"{topology.url}/metrics").status_code == 404
    assert httpx.get(f"{topology.url}/metrics/").status_code == 404
    direct = httpx.get(f"http://127.0.0.1:{topology.replica_port(1)}/metrics")
    assert direct.status_code == 200


def test_a_body_too_big_for_nginx_memory_gets_through(topology: Topology) -> None:
    """Over client_body_buffer_size nginx writes the body to its temp path under STACK_DIR,
    which here lies under a directory only its owner may enter (pytest's 0700 temp
    root, like /root): workers running as `nobody` failed exactly there."""
    text = " ".join(f"Paragraph {i} of a long maintenance note." for i in range(4000))
    body = {"documents": [{"text": text, "source": f"big-{uuid.uuid4().hex}.txt"}]}
    response = httpx.post(f"{topology.url}/documents", json=body, timeout=120)
    assert response.status_code == 200, response.text
    (document,) = response.json()["documents"]
    assert document["status"] == "created"
    gone = httpx.delete(f"{topology.url}/documents/{document['id']}", timeout=60)
    assert gone.status_code == 200  # the other tests' corpus as it was
    if os.geteuid() == 0:  # and the workers that took the body were not root
        master = _pid(topology, "nginx")
        workers = [pid for pid in descendants(master) if _uid(pid) is not None]
        assert workers and {_uid(pid) for pid in workers} == {pwd.getpwnam("nobody").pw_uid}


def _uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_nginx_and_the_api_log_the_same_request_id(topology: Topology) -> None:
    for given in (None, f"client-{uuid.uuid4().hex}"):
        headers = {"x-request-id": given} if given else {}
        response = httpx.post(f"{topology.url}/query", json=QUESTION, headers=headers, timeout=60)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        assert given is None or request_id == given
        assert response.headers.get_list("x-request-id") == [request_id]  # once, not twice
        edge = _nginx_entry(topology, request_id)
        port = int(str(edge["upstream_addr"]).rsplit(":", 1)[1])
        replica = topology.replica_names()[port - topology.api_port]
        log = topology.log_dir / f"{replica}.log"

        def api_lines(log: Path = log, request_id: str = request_id) -> list[dict[str, object]]:
            return [
                json.loads(line)
                for line in log.read_text().splitlines()
                if line.startswith("{") and request_id in line
            ]

        # The API writes its access lines a flusher tick later (api/telemetry/flusher.py).
        wait_until(
            lambda: any(e["logger"] == "api.access" for e in api_lines()),
            5,
            f"the API's access line for {request_id}",
        )
        access = [e for e in api_lines() if e["logger"] == "api.access"]
        assert [(e["event"], e["route"]) for e in access] == [("request", "/query")]


def test_prometheus_scrapes_every_target(topology: Topology) -> None:
    def up() -> dict[str, float]:
        # The stack's own targets; a load test's come and go with its runs.
        result = httpx.get(
            f"{topology.prometheus_url}/api/v1/query", params={"query": 'up{job!="loadtest"}'}
        ).json()["data"]["result"]
        return {
            f"{r['metric']['job']}/{r['metric'].get('replica', r['metric']['instance'])}": float(
                r["value"][1]
            )
            for r in result
        }

    expected = {"rag-api/api-1", "rag-api/api-2"}
    # The first scrapes happen within one scrape interval (15 s) of start-up.
    wait_until(lambda: len(up()) == 5 and all(v == 1 for v in up().values()), 60, "every target up")
    targets = up()
    assert expected <= targets.keys()
    assert {k.split("/")[0] for k in targets} == {"rag-api", "nginx", "redis", "prometheus"}


def test_rendered_configuration_passes_the_tools_own_checks(topology: Topology) -> None:
    prometheus = topology.stack_dir / "prometheus" / "prometheus.yml"
    check = subprocess.run(
        ["promtool", "check", "config", str(prometheus)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    native.check_nginx(topology)  # raises StackError with nginx's complaint


def test_a_second_stack_on_the_same_ports_is_refused(topology: Topology) -> None:
    with pytest.raises(native.StackError, match="already running"):
        native.up(topology)


def test_the_edge_enforces_the_body_limit_the_replicas_are_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_REQUEST_BYTES", "52428800")
    get_settings.cache_clear()  # the replicas will read this environment; so must nginx
    try:
        values = nginx_values(Topology(stack_dir=tmp_path), "off")
    finally:
        get_settings.cache_clear()
    assert values["MAX_REQUEST_BYTES"] == "52428800"


def _programs(topology: Topology) -> dict[str, dict[str, str]]:
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(topology.stack_dir / "supervisord.conf")
    return {s.split(":", 1)[1]: dict(conf[s]) for s in conf.sections() if s.startswith("program:")}


def test_the_stack_stops_edge_first_and_stores_last(topology: Topology) -> None:
    """supervisord stops by descending priority: clients stop coming before the replicas
    drain, and the replicas drain before what they call goes away."""
    programs = _programs(topology)
    priority = {name: int(program["priority"]) for name, program in programs.items()}
    replicas = [priority[name] for name in topology.replica_names()]
    stores = [priority[name] for name in ("redis", "chroma", "llm")]
    assert max(stores) < min(replicas) and max(replicas) < priority["nginx"]
    assert priority["nginx"] < min(priority[n] for n in ("prometheus", "nginx-exporter"))
    assert programs["nginx"]["stopsignal"] == "QUIT"  # finishes what it holds


def test_templates_refuse_missing_values_and_ports_must_not_clash() -> None:
    assert render_template("listen ${NGINX_LISTEN}; $request_id", {"NGINX_LISTEN": "1:2"}) == (
        "listen 1:2; $request_id"
    )
    with pytest.raises(ValueError, match="NGINX_LISTEN"):
        render_template("listen ${NGINX_LISTEN};", {})
    with pytest.raises(SystemExit, match="clash"):
        Topology.from_env({"NGINX_PORT": "9090"})
    with pytest.raises(SystemExit, match="REPLICAS"):
        Topology.from_env({"REPLICAS": "0"})
    with pytest.raises(SystemExit, match="past 65535"):
        Topology.from_env({"API_PORT": "65535", "REPLICAS": "2"})
    assert Topology.from_env({"API_PORT": "65534", "REPLICAS": "2"}).replica_port(2) == 65535


def test_the_cli_names_a_busy_port_and_changes_nothing(topology: Topology, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "STACK_DIR": str(tmp_path / "other"),
        "NGINX_PORT": str(topology.nginx_port),  # held by the running stack's nginx
    }

    def cli(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deployment.stack", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    up = cli("up")
    assert up.returncode == 1
    assert f"nginx ({topology.nginx_port})" in up.stderr
    assert "Traceback" not in up.stderr
    assert not (tmp_path / "other" / "supervisord.conf").exists()
    status = cli("status")
    assert status.returncode == 1 and "no stack running" in status.stdout


def test_awkward_paths_and_passwords_reach_every_program_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A space, a %, non-ASCII and quotes each mean something different to supervisord,
    nginx and redis.conf: what each program reads back is what was meant."""
    from supervisor.options import ServerOptions

    password = 'pa"ss\\wörd%'
    monkeypatch.setenv("REDIS_PASSWORD", password)
    topology = stack_on_free_ports(tmp_path / "stack dir 50% josé", replicas=2, workers=1)
    render(topology)
    try:
        native.check_nginx(topology)  # nginx -t: the quoted paths parse
        options = ServerOptions()
        options.configfile = str(topology.stack_dir / "supervisord.conf")
        options.process_config(do_usage=False)  # supervisord's own parser and % expansion
        programs = {p.name: p for g in options.process_group_configs for p in g.process_configs}
        for index, name in enumerate(topology.replica_names(), start=1):
            assert programs[name].environment == replica_env(topology, index)
        redis = programs["redis"]
        assert redis.stdout_logfile == str(topology.log_dir / "redis.log")
        assert shlex.split(redis.command)[-1] == str(topology.stack_dir / "redis.conf")

        server = Process(shlex.split(redis.command), tmp_path / "redis.log", cwd=topology.stack_dir)
        server.start()
        try:
            client = redis_client.Redis(port=topology.redis_port, password=password)
            server.ready(lambda: bool(client.ping()), 30, "redis with the generated config")
            with pytest.raises(redis_client.AuthenticationError):
                redis_client.Redis(port=topology.redis_port, password="wrong").ping()
        finally:
            server.stop()
        assert (topology.stack_dir / "redis" / "appendonlydir").is_dir()  # its dir, as written
    finally:  # as root, nginx's temp paths are outside tmp_path (in /tmp)
        shutil.rmtree(topology.nginx_temp_dir, ignore_errors=True)


@pytest.mark.parametrize("awkward", ['say "hi"', "o'brien", "back\\slash", "$HOME", "line\nbreak"])
def test_a_path_no_config_can_name_is_refused(tmp_path: Path, awkward: str) -> None:
    with pytest.raises(SystemExit, match="cannot name a path"):
        Topology.from_env({"STACK_DIR": str(tmp_path / awkward)})


def test_every_program_of_the_stack_carries_its_mark(topology: Topology) -> None:
    """What lets `stack down` find them if supervisord dies: the env -i programs too."""
    members = set(native._members(topology))
    names = [line.split()[0] for line in native.supervisorctl(topology, "status").splitlines()]
    assert len(names) >= 9
    assert [name for name in names if _pid(topology, name) not in members] == []


def _quit_stops() -> None:
    """In the child: SIGQUIT at its default, as nginx's own handler makes it a stop. A
    test run started in the background by a shell (`cmd &`, a CI job) inherits it
    ignored, and bash cannot undo that."""
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def test_down_stops_what_a_dead_supervisord_left_running(tmp_path: Path) -> None:
    """Found by the mark in their environment, or, for nginx and redis-server (which
    overwrite it), by the titles this stack gives them; another stack's, even one inside
    this one's directory, and anything unmarked are left alone."""
    stack_dir = tmp_path / "stack"
    nested = stack_dir / "nested"

    def sleeper(mark: Path | None) -> subprocess.Popen[bytes]:
        env = {**os.environ}
        if mark is not None:
            env[MEMBER_ENV] = str(mark)
        return subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)

    def titled(title: str) -> subprocess.Popen[bytes]:
        """A process whose command line is exactly `title` (cat, waiting on stdin)."""
        return subprocess.Popen(
            ["bash", "-c", 'exec -a "$0" cat', title],
            stdin=subprocess.PIPE,
            start_new_session=True,
            cwd=tmp_path,  # where a core dump from SIGQUIT would go, if enabled
            preexec_fn=_quit_stops,  # noqa: PLW1509  # no threads of the test's own here
        )

    def nginx(prefix: Path) -> subprocess.Popen[bytes]:
        return titled(f"nginx: master process nginx -p {prefix}/nginx -c {prefix}/nginx/n.conf")

    def redis(prefix: Path) -> subprocess.Popen[bytes]:
        return titled(f"redis-server 127.0.0.1:6390 {prefix}/redis.conf")

    ours = {"marked": sleeper(stack_dir), "nginx": nginx(stack_dir), "redis": redis(stack_dir)}
    others = {
        "another stack's": sleeper(tmp_path / "other"),
        "unmarked": sleeper(None),
        "nested nginx": nginx(nested),
        "nested redis": redis(nested),
    }
    try:
        topology = Topology(stack_dir=stack_dir)
        wait_until(lambda: len(native._members(topology)) == 3, 10, "the titles set")
        with pytest.raises(native.StackError, match="make stack-down"):
            native.up(topology)  # refused: its ports may be held by the orphans
        assert native.down(topology) is True
        assert ours["marked"].wait(10) == -signal.SIGTERM
        assert ours["redis"].wait(10) == -signal.SIGTERM
        assert ours["nginx"].wait(10) == -signal.SIGQUIT  # nginx's graceful stop
        assert {name for name, p in others.items() if p.poll() is not None} == set()
        assert native.down(topology) is False
    finally:
        for process in (*ours.values(), *others.values()):
            process.kill()
            process.wait(10)


def test_stack_down_needs_only_the_stack_dir(tmp_path: Path) -> None:
    """A bad port setting in the shell must not keep a stack from stopping."""
    env = {**os.environ, "STACK_DIR": str(tmp_path), "NGINX_PORT": "not-a-port"}
    run = subprocess.run(
        [sys.executable, "-m", "deployment.stack", "down"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "no stack running", run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "deployment.stack", "up"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode != 0 and "NGINX_PORT" in run.stderr

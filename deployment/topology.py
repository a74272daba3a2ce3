"""The production topology, once: which servers run, on which ports, with what settings.

`make stack` renders it into native configuration (nginx, Prometheus targets, redis.conf,
supervisord.conf) under STACK_DIR; compose and Kubernetes are checked against the same
description, so the three cannot drift apart.

Every port and count comes from the environment, with these defaults:

    REPLICAS=2  WEB_CONCURRENCY=2  NGINX_PORT=8080  NGINX_STATUS_PORT=8081
    API_PORT=8001 (replica i listens on API_PORT+i-1)  REDIS_PORT=6390  CHROMA_PORT=8200
    LLM_PORT=8090  PROMETHEUS_PORT=9090  NGINX_EXPORTER_PORT=9113  REDIS_EXPORTER_PORT=9121
    STACK_DIR=./var
"""

from __future__ import annotations

import functools
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from api.config import get_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "deployment"
HOST = "127.0.0.1"
# nginx skips a replica for 10 s after 3 failed attempts within 10 s (refused, reset, timed
# out, 502), then tries it again: one reset connection does not take a replica out.
UPSTREAM_PARAMS = "max_fails=3 fail_timeout=10s"
NGINX_WORKER_USER = "nobody"  # when the stack runs as root


def _port(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"{name}={raw!r} is not a port number")
    return int(raw)


def _count(env: dict[str, str], name: str, default: int, most: int) -> int:
    raw = env.get(name, str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise SystemExit(f"{name}={raw!r}: expected a whole number from 1 to {most}")
    return int(raw)


@dataclass(frozen=True)
class Topology:
    replicas: int = 2
    workers: int = 2
    nginx_port: int = 8080
    nginx_status_port: int = 8081
    api_port: int = 8001
    redis_port: int = 6390
    chroma_port: int = 8200
    llm_port: int = 8090
    prometheus_port: int = 9090
    nginx_exporter_port: int = 9113
    redis_exporter_port: int = 9121
    stack_dir: Path = field(default_factory=lambda: ROOT / "var")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Topology:
        env = dict(os.environ if env is None else env)
        topology = cls(
            replicas=_count(env, "REPLICAS", 2, 16),
            workers=_count(env, "WEB_CONCURRENCY", 2, 64),
            nginx_port=_port(env, "NGINX_PORT", 8080),
            nginx_status_port=_port(env, "NGINX_STATUS_PORT", 8081),
            api_port=_port(env, "API_PORT", 8001),
            redis_port=_port(env, "REDIS_PORT", 6390),
            chroma_port=_port(env, "CHROMA_PORT", 8200),
            llm_port=_port(env, "LLM_PORT", 8090),
            prometheus_port=_port(env, "PROMETHEUS_PORT", 9090),
            nginx_exporter_port=_port(env, "NGINX_EXPORTER_PORT", 9113),
            redis_exporter_port=_port(env, "REDIS_EXPORTER_PORT", 9121),
            stack_dir=stack_dir_from_env(env),
        )
        _writable_path("the checkout's path", ROOT)
        last = topology.replica_port(topology.replicas)
        if last > 65535:
            raise SystemExit(
                f"API_PORT={topology.api_port} with REPLICAS={topology.replicas}: the replicas "
                f"take ports {topology.api_port}-{last}, past 65535"
            )
        ports = topology.ports()
        clashes = {p for p in ports.values() if list(ports.values()).count(p) > 1}
        if clashes:
            names = sorted(n for n, p in ports.items() if p in clashes)
            raise SystemExit(f"port clash between {', '.join(names)}")
        return topology

    # --- names and places
    def replica_names(self) -> list[str]:
        return [f"api-{i}" for i in range(1, self.replicas + 1)]

    def replica_port(self, index: int) -> int:
        return self.api_port + index - 1

    def replica_metrics_dir(self, index: int) -> Path:
        return self.run_dir / f"{self.replica_names()[index - 1]}-metrics"

    def ports(self) -> dict[str, int]:
        ports = {
            "nginx": self.nginx_port,
            "nginx-status": self.nginx_status_port,
            "redis": self.redis_port,
            "chroma": self.chroma_port,
            "llm": self.llm_port,
            "prometheus": self.prometheus_port,
            "nginx-exporter": self.nginx_exporter_port,
            "redis-exporter": self.redis_exporter_port,
        }
        for i, name in enumerate(self.replica_names(), start=1):
            ports[name] = self.replica_port(i)
        return ports

    @property
    def log_dir(self) -> Path:
        return self.stack_dir / "log"

    @property
    def nginx_temp_dir(self) -> Path:
        """Under STACK_DIR, unless the stack runs as root (see `_own_temp_dir`)."""
        if os.geteuid() != 0:
            return self.stack_dir / "nginx" / "tmp"
        tag = hashlib.sha256(str(self.stack_dir.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"rag-nginx-{tag}"

    @property
    def run_dir(self) -> Path:
        return self.stack_dir / "run"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.nginx_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{HOST}:{self.prometheus_port}"

    def redis_password(self) -> str:
        """REDIS_PASSWORD, or one made on first start and kept (0600) under STACK_DIR."""
        if given := os.environ.get("REDIS_PASSWORD"):
            if any(c.isspace() for c in given) or not given.isprintable():
                raise SystemExit("REDIS_PASSWORD: printable characters only, no spaces")
            return given
        path = self.stack_dir / "redis" / "password"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, secrets.token_urlsafe(24))
        return path.read_text().strip()

    def redis_url(self) -> str:
        return f"redis://:{quote(self.redis_password(), safe='')}@{HOST}:{self.redis_port}/0"


# --- rendering
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# What no generated file can carry as it is: supervisord's environment= values cannot
# hold quotes, nginx reads $ as a variable, and a control character ends a line.
_UNWRITABLE = re.compile(r"[\"'\\$\x00-\x1f\x7f]")


def _writable_path(name: str, path: Path) -> Path:
    """A path the generated configs can name: spaces, % and non-ASCII are quoted or
    escaped where they go; quotes, backslashes, $ and control characters are refused."""
    resolved = path.resolve()
    if bad := _UNWRITABLE.search(str(resolved)):
        raise SystemExit(
            f"{name} {str(resolved)!r}: the stack's config files cannot name a path with "
            f"{bad.group()!r} in it; use another directory"
        )
    return resolved


def stack_dir_from_env(env: dict[str, str]) -> Path:
    """STACK_DIR alone: what stopping or inspecting a stack needs (its configuration holds
    the rest), so a bad port setting in the shell cannot keep a stack from stopping."""
    return _writable_path("STACK_DIR", Path(env.get("STACK_DIR", str(ROOT / "var"))))


# Set in the environment of every process the stack starts (supervisord's, inherited, and
# the env -i programs' own), so that they can be found even if supervisord has died;
# nginx and redis-server overwrite theirs with their process titles, which name STACK_DIR.
MEMBER_ENV = "RAG_STACK_MEMBER"


def member_signal(topology: Topology, environ: bytes, command: bytes) -> signal.Signals | None:
    """The signal that stops a process gracefully if this stack started it, else None;
    `environ` and `command` as /proc gives them. A member carries MEMBER_ENV, or, for
    the two programs that overwrite their environment, the title this module gives
    them: nginx's master names its prefix (`nginx -p`), redis-server its configuration
    file (`proc-title-template`). nginx's workers follow their master."""
    title = command.replace(b"\0", b" ").rstrip()
    nginx = f" -p {topology.stack_dir / 'nginx'} -c ".encode()
    if title.startswith(b"nginx: master process ") and nginx in title:
        return signal.SIGQUIT  # finishes the requests it holds
    redis = f" {topology.stack_dir / 'redis.conf'}".encode()
    mark = f"\0{MEMBER_ENV}={topology.stack_dir}\0".encode()
    if (title.startswith(b"redis-server ") and title.endswith(redis)) or mark in b"\0" + environ:
        return signal.SIGTERM
    return None


def _nginx_path(path: Path) -> str:
    return f'"{path}"'  # spaces; _writable_path refused what a quoted string cannot hold


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill ${NAME} placeholders (what envsubst would), refusing any that has no value.
    nginx's own `$variables` are lower case and unbraced, so they are left alone."""
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise ValueError(f"no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def nginx_values(topology: Topology, access_log: str) -> dict[str, str]:
    servers = [
        f"server {HOST}:{topology.replica_port(i)} {UPSTREAM_PARAMS};"
        for i in range(1, topology.replicas + 1)
    ]
    return {
        "API_UPSTREAM_SERVERS": "\n    ".join(servers),
        "NGINX_LISTEN": f"{HOST}:{topology.nginx_port}",
        "NGINX_STATUS_LISTEN": f"{HOST}:{topology.nginx_status_port}",
        "NGINX_ACCESS_LOG": access_log,
        # What the replicas will enforce: the same environment (and .env) configures them.
        "MAX_REQUEST_BYTES": str(get_settings().max_request_bytes),
    }


def _nginx_main(topology: Topology) -> str:
    """The native main context: paths under STACK_DIR, so nginx runs without root's
    directories and without touching the system's nginx."""
    nginx_dir = topology.stack_dir / "nginx"
    temp = topology.nginx_temp_dir
    user = ""
    if os.geteuid() == 0:  # the workers, which parse what clients send, give up root
        nobody = pwd.getpwnam(NGINX_WORKER_USER)
        user = f"user {nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name};\n"
    return f"""# Generated by deployment/topology.py for the native stack; edit rag.conf.template.
{user}worker_processes auto;
# Each proxied request holds two descriptors; a shell's default of 1024 would cap a
# worker near 500 clients, well under worker_connections.
worker_rlimit_nofile 16384;
daemon off;
pid {_nginx_path(topology.run_dir / "nginx.pid")};
error_log {_nginx_path(topology.log_dir / "nginx-error.log")} warn;

events {{
    worker_connections 4096;
}}

http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    client_body_temp_path {_nginx_path(temp / "body")};
    proxy_temp_path {_nginx_path(temp / "proxy")};
    fastcgi_temp_path {_nginx_path(temp / "fastcgi")};
    uwsgi_temp_path {_nginx_path(temp / "uwsgi")};
    scgi_temp_path {_nginx_path(temp / "scgi")};

    include {_nginx_path(nginx_dir / "rag.conf")};
}}
"""


def _targets(topology: Topology) -> dict[str, list[dict[str, object]]]:
    return {
        "rag-api": [
            {
                "targets": [f"{HOST}:{topology.replica_port(i)}"],
                "labels": {"replica": name},
            }
            for i, name in enumerate(topology.replica_names(), start=1)
        ],
        "nginx": [{"targets": [f"{HOST}:{topology.nginx_exporter_port}"]}],
        "redis": [{"targets": [f"{HOST}:{topology.redis_exporter_port}"]}],
        "prometheus": [{"targets": [f"{HOST}:{topology.prometheus_port}"]}],
        # Filled in by a running `make loadtest` (loadtest/live.py), emptied when it ends.
        "loadtest": [],
    }


def _redis_conf(topology: Topology) -> str:
    return f"""# Generated by deployment/topology.py.
bind {HOST}
port {topology.redis_port}
protected-mode yes
requirepass {_redis_string(topology.redis_password())}
dir {_redis_string(str(topology.stack_dir / "redis"))}
appendonly yes
appendfsync everysec
save 300 10
daemonize no
# Its process title names this file: redis-server rewrites its environment, so the
# title is how `stack down` finds it if supervisord has died.
proc-title-template "{{title}} {{listen-addr}} {{config-file}}"
"""


def _redis_string(value: str) -> str:
    # redis.conf's quoted strings take \" and \\ escapes and raw UTF-8 (not \\u).
    return json.dumps(value, ensure_ascii=False)


# supervisord starts programs by priority, lowest first, and stops them in reverse: the
# edge stops taking clients and finishes what it holds, then the replicas drain, and the
# stores they use go last. Monitoring starts last and stops first.
PRIORITIES = {"dependency": 100, "replica": 200, "edge": 300, "monitoring": 400}
STOP_WAIT_SECONDS = 40


def _program(name: str, command: list[str], topology: Topology, role: str, **extra: str) -> str:
    lines = [
        f"[program:{name}]",
        f"priority={PRIORITIES[role]}",
        "command=" + " ".join(_quote(part) for part in command),
        f"directory={_supervisor_text(str(ROOT))}",
        "autostart=true",
        # Restarted whenever it exits, whatever the exit code: a replica killed by the
        # kernel's OOM killer exits 137, which is exactly when it must come back.
        "autorestart=true",
        "startsecs=2",
        "startretries=10",
        # The whole process group: a gunicorn master and its workers stop together.
        "stopasgroup=true",
        "killasgroup=true",
        f"stopwaitsecs={STOP_WAIT_SECONDS}",
        "redirect_stderr=true",
        # Expanded twice by supervisord (4.3), where every other value is expanded once.
        "stdout_logfile="
        + _supervisor_text(_supervisor_text(str(topology.log_dir / f"{name}.log"))),
        "stdout_logfile_maxbytes=50MB",
        "stdout_logfile_backups=3",
    ]
    lines += [f"{key}={value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def _supervisor_text(text: str) -> str:
    # supervisord expands %(name)s in its values: a literal % is written %%.
    return text.replace("%", "%%")


def _quote(part: str) -> str:
    # supervisord splits commands as a POSIX shell would: \" and \\ inside double
    # quotes, everything else (UTF-8 included) as it is.
    bare = re.fullmatch(r"[A-Za-z0-9_./:=,@%+-]+", part)
    return _supervisor_text(part if bare else json.dumps(part, ensure_ascii=False))


def _bare_env(topology: Topology, extra: dict[str, str]) -> list[str]:
    """A command prefix that runs the program with only these variables (env -i)."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    mark = {MEMBER_ENV: str(topology.stack_dir)}
    return ["env", "-i", *(f"{k}={v}" for k, v in {**keep, **mark, **extra}.items())]


def _environment(env: dict[str, str]) -> str:
    """supervisord's environment=: its parser (non-POSIX shlex) takes a double-quoted
    value as it is, with no escapes, and strips quotes from both ends."""
    for key, value in env.items():
        if bad := _UNWRITABLE.search(value):
            raise ValueError(f"{key}: {bad.group()!r} cannot be passed through supervisord")
    return ",".join(f'{k}="{_supervisor_text(v)}"' for k, v in env.items())


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from the first byte (it holds a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def replica_env(topology: Topology, index: int) -> dict[str, str]:
    return {
        "PORT": str(topology.replica_port(index)),
        "HOST": HOST,
        "WEB_CONCURRENCY": str(topology.workers),
        "CHROMA_HOST": HOST,
        "CHROMA_PORT": str(topology.chroma_port),
        "REDIS_URL": topology.redis_url(),
        "LLM_BASE_URL": f"http://{HOST}:{topology.llm_port}/v1",
        "LLM_GGUF": str(_llm_model()),
        # The stack loads the sample corpus once, through nginx, after everything is up.
        "INGEST_ON_START": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(topology.replica_metrics_dir(index)),
    }


@functools.cache
def _llm_model() -> Path:
    """Found once: it searches the installed package, and every replica names it."""
    from api.runner import local_model_path

    return local_model_path()


def _supervisord(topology: Topology) -> str:
    from api.config import get_settings
    from api.runner import gunicorn_command, llm_server_command

    python = sys.executable
    run, logs = topology.run_dir, topology.log_dir
    parts = [
        f"""; Generated by deployment/topology.py: the native production topology.
[unix_http_server]
file={_supervisor_text(str(run / "supervisor.sock"))}
chmod=0700

[supervisord]
logfile={_supervisor_text(str(logs / "supervisord.log"))}
pidfile={_supervisor_text(str(run / "supervisord.pid"))}
childlogdir={_supervisor_text(str(logs))}
nodaemon=false
silent=true
; Its programs inherit it: nginx's workers and the replicas hold a descriptor per client.
minfds=16384

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{_supervisor_text(str(run / "supervisor.sock"))}
"""
    ]
    parts.append(
        _program(
            "redis",
            ["redis-server", str(topology.stack_dir / "redis.conf")],
            topology,
            "dependency",
        )
    )
    parts.append(
        _program(
            "chroma",
            [
                # Chroma's telemetry phones home.
                *_bare_env(topology, {"ANONYMIZED_TELEMETRY": "False"}),
                str(Path(python).parent / "chroma"),
                "run",
                "--host",
                HOST,
                "--port",
                str(topology.chroma_port),
                "--path",
                str(topology.stack_dir / "chroma"),
            ],
            topology,
            "dependency",
        )
    )
    settings = get_settings().model_copy(update={"llm_port": topology.llm_port})
    # llama_cpp.server also reads PORT, HOST, MODEL... from its environment, and those
    # would override its command line: it starts with an empty one.
    parts.append(
        _program(
            "llm",
            [*_bare_env(topology, {}), *llm_server_command(settings, _llm_model())],
            topology,
            "dependency",
        )
    )
    for index, name in enumerate(topology.replica_names(), start=1):
        parts.append(
            _program(
                name,
                gunicorn_command(),
                topology,
                "replica",
                environment=_environment(replica_env(topology, index)),
            )
        )
    parts.append(
        _program(
            "nginx",
            ["nginx", "-p", str(topology.stack_dir / "nginx"), "-c", str(_nginx_conf(topology))],
            topology,
            "edge",
            # QUIT is nginx's graceful stop: requests in flight are finished (TERM cuts them).
            stopsignal="QUIT",
        )
    )
    prometheus_dir = topology.stack_dir / "prometheus"
    parts.append(
        _program(
            "prometheus",
            [
                "prometheus",
                f"--config.file={prometheus_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prometheus_dir / 'data'}",
                f"--web.listen-address={HOST}:{topology.prometheus_port}",
                "--enable-feature=exemplar-storage",
                "--web.enable-lifecycle",
            ],
            topology,
            "monitoring",
        )
    )
    parts.append(
        _program(
            "nginx-exporter",
            [
                "prometheus-nginx-exporter",
                f"-nginx.scrape-uri=http://{HOST}:{topology.nginx_status_port}/stub_status",
                f"-web.listen-address={HOST}:{topology.nginx_exporter_port}",
            ],
            topology,
            "monitoring",
        )
    )
    parts.append(
        _program(
            "redis-exporter",
            [
                "prometheus-redis-exporter",
                f"-redis.addr=redis://{HOST}:{topology.redis_port}",
                f"-redis.password-file={_redis_password_file(topology)}",
                f"-web.listen-address={HOST}:{topology.redis_exporter_port}",
            ],
            topology,
            "monitoring",
        )
    )
    return "\n".join(parts)


def _redis_password_file(topology: Topology) -> Path:
    """redis_exporter's password file maps each Redis URI to its password (JSON)."""
    return topology.stack_dir / "redis" / "exporter-passwords.json"


def _nginx_conf(topology: Topology) -> Path:
    return topology.stack_dir / "nginx" / "nginx.conf"


def _own_temp_dir(path: Path) -> None:
    """nginx's temp paths, where a body or a response too big for memory spills: its
    workers (nobody, when the stack runs as root) must reach them, and STACK_DIR may lie
    under a directory they cannot enter (/root is 0700). So, as root, they live in a
    directory of the system's temp dir that belongs to the worker user, and only to it."""
    path.mkdir(mode=0o700, exist_ok=True)
    found, worker = path.lstat(), pwd.getpwnam(NGINX_WORKER_USER).pw_uid
    if not stat.S_ISDIR(found.st_mode) or found.st_uid not in (0, worker):
        raise SystemExit(f"{path} exists and is not ours: remove it, or set STACK_DIR")
    os.chown(path, worker, -1)
    path.chmod(0o700)


def render(topology: Topology) -> None:
    """Write every native configuration file under STACK_DIR."""
    stack = topology.stack_dir
    if os.geteuid() == 0:
        _own_temp_dir(topology.nginx_temp_dir)
    for directory in (
        topology.log_dir,
        topology.run_dir,
        stack / "redis",
        stack / "chroma",
        stack / "nginx",
        topology.nginx_temp_dir,
        stack / "prometheus" / "targets",
        stack / "prometheus" / "data",
        *(topology.replica_metrics_dir(i) for i in range(1, topology.replicas + 1)),
    ):
        directory.mkdir(parents=True, exist_ok=True)
    write_private(stack / "redis.conf", _redis_conf(topology))
    write_private(
        _redis_password_file(topology),
        json.dumps({f"redis://{HOST}:{topology.redis_port}": topology.redis_password()}),
    )

    template = (DEPLOYMENT / "nginx" / "rag.conf.template").read_text()
    access_log = _nginx_path(topology.log_dir / "nginx-access.log")
    (stack / "nginx" / "rag.conf").write_text(
        render_template(template, nginx_values(topology, access_log))
    )
    _nginx_conf(topology).write_text(_nginx_main(topology))

    prometheus_dir = stack / "prometheus"
    shutil.copy(DEPLOYMENT / "prometheus" / "prometheus.yml", prometheus_dir / "prometheus.yml")
    rules = prometheus_dir / "rules"
    shutil.rmtree(rules, ignore_errors=True)
    shutil.copytree(DEPLOYMENT / "prometheus" / "rules", rules)
    for job, groups in _targets(topology).items():
        path = prometheus_dir / "targets" / f"{job}.json"
        path.write_text(json.dumps(groups, indent=2) + "\n")

    write_private(stack / "supervisord.conf", _supervisord(topology))  # holds the password

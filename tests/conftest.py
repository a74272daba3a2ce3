from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from api.embeddings import Embedder
from api.main import create_app
from deployment import stack as native
from deployment.topology import Topology
from tests.servers import ROOT, ChromaServer, LlamaServer, RedisServer, stack_on_free_ports

# Tracing patches httpx and redis process-wide: in-process test apps must not do that to
# the test runner's own clients. Tests of tracing run the server as a subprocess.
os.environ["OTEL_SDK_DISABLED"] = "true"

MODEL_DIR = ROOT / "models"
CORPUS_DIR = ROOT / "documents"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_in_tmp() -> Iterator[None]:
    """A stack run as root keeps nginx's temp paths in /tmp, outside any test's tmp_path:
    whatever renders one must remove it, as `make stack-down` does."""
    before = set(Path(tempfile.gettempdir()).glob("rag-nginx-*"))
    yield
    left = set(Path(tempfile.gettempdir()).glob("rag-nginx-*")) - before
    assert not left, f"left behind by the tests: {sorted(map(str, left))}"


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    # One model for the whole run, as in a worker process.
    return Embedder(MODEL_DIR, threads=2)


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path_factory.mktemp("chroma"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(tmp_path_factory.mktemp("llama"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "model_dir": MODEL_DIR,
        "documents_dir": tmp_path / "documents",
        "ingest_on_start": False,
        "chroma_collection_prefix": f"t{uuid.uuid4().hex[:12]}",
        "log_format": "console",
        # Most tests are about retrieval, caching and input; the LLM has its own tests.
        "generator": "extractive",
    }
    base.update(overrides)
    return Settings(**base)


def services_of(client: TestClient) -> Any:
    """The app's process-wide services, for assertions on the real store behind the API."""
    return cast(Any, client.app).state.services


ClientFactory = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def make_client(tmp_path: Path, embedder: Embedder) -> ClientFactory:
    """`with make_client(**settings) as client:` runs the real app (lifespan included)."""

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        settings = make_settings(tmp_path, **overrides)
        # The shared model is int8; another precision gets a model of its own.
        shared = embedder if settings.embed_precision == "int8" else None
        with TestClient(create_app(settings, shared)) as client:
            yield client

    return factory


@pytest.fixture
def client(make_client: ClientFactory) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


@pytest.fixture(scope="session")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """`make stack`'s topology on free ports under a temporary STACK_DIR, once per run."""
    # One worker per replica: the machine has two cores to share with the load.
    topology = stack_on_free_ports(tmp_path_factory.mktemp("stack"), replicas=2, workers=1)
    native.up(topology, timeout=240)
    try:
        yield topology
    finally:
        assert native.down(topology)
        # Everything it started is gone: nothing listens on any of its ports.
        for name, port in topology.ports().items():
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{name} still listening"

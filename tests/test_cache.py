"""The answer cache against a real redis-server and a real `chroma run` server."""

from __future__ import annotations

import time
import uuid

import pytest

from api.schemas import QueryResponse
from tests.conftest import services_of
from tests.servers import ChromaServer, RedisServer

FREEZE = {
    "text": "The deploy freeze starts on the 20th of December and ends on January 3rd.",
    "source": "freeze.txt",
}
PAGER = {
    "text": "The pager rotation hands over every Monday at ten in the morning.",
    "source": "pager.txt",
}
QUESTION = {"question": "When does the deploy freeze start?"}


@pytest.fixture
def served(make_client, chroma_server: ChromaServer, redis_server: RedisServer):
    with make_client(
        chroma_host="127.0.0.1",
        chroma_port=chroma_server.port,
        redis_url=redis_server.url,
        redis_retry_seconds=0.2,
    ) as client:
        yield client


def ask(client, body=QUESTION) -> dict:
    response = client.post("/query", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_second_identical_question_is_served_from_cache(served):
    served.post("/documents", json={"documents": [FREEZE, PAGER]})
    first = ask(served)
    assert first["cached"] is False and first["sources"][0]["document"] == "freeze.txt"
    second = ask(served, {"question": "  when does the DEPLOY freeze start?"})
    assert second["cached"] is True
    # The cached body is the stored record with its timing spliced in: the same answer in
    # the same public shape, apart from the timing, the flag and the tokens not spent.
    for body in (first, second):
        QueryResponse.model_validate(body)
    same = {"processing_time", "cached", "usage"}
    assert {k: v for k, v in second.items() if k not in same} == {
        k: v for k, v in first.items() if k not in same
    }
    # Its own timing, not the one stored with the record.
    assert second["usage"] is None and second["processing_time"] > 0
    assert second["processing_time"] != first["processing_time"]
    # Different parameters are a different answer.
    assert ask(served, {**QUESTION, "max_sources": 1})["cached"] is False


def test_ingest_and_delete_invalidate_cached_answers(served):
    doc_id = served.post("/documents", json={"documents": [FREEZE]}).json()["documents"][0]["id"]
    ask(served)
    assert ask(served)["cached"] is True

    served.post("/documents", json={"documents": [PAGER]})
    after_ingest = ask(served)
    assert after_ingest["cached"] is False
    assert {s["document"] for s in after_ingest["sources"]} == {"freeze.txt", "pager.txt"}
    assert ask(served)["cached"] is True

    assert served.delete(f"/documents/{doc_id}").status_code == 200
    after_delete = ask(served)
    assert after_delete["cached"] is False
    assert {s["document"] for s in after_delete["sources"]} == {"pager.txt"}

    # Idempotent re-ingest of the same content changes nothing and the cache stays valid.
    served.post("/documents", json={"documents": [PAGER]})
    assert ask(served)["cached"] is True


@pytest.mark.parametrize(
    "damaged", [b"", b"{}", b'{"answer":"cut sh', b"not json", b'{"answer":"x","sources":[{}']
)
def test_a_damaged_cached_answer_is_a_miss_not_an_answer(served, redis_server, damaged):
    import redis

    served.post("/documents", json={"documents": [FREEZE]})
    first = ask(served)
    client = redis.Redis.from_url(redis_server.url)
    namespace = services_of(served).cache.namespace  # the corpus: CHROMA_COLLECTION_PREFIX
    (key,) = client.keys(f"{namespace}:answer:*")
    client.set(key, damaged)
    again = ask(served)
    assert again["cached"] is False and again["answer"] == first["answer"]
    client.set(key, damaged)
    with served.stream("POST", "/query", json={**QUESTION, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    assert events[0] == "event: sources" and events[-1] == "event: done"
    # The damaged record was replaced by a whole one.
    assert ask(served)["cached"] is True


def test_query_embeddings_are_cached_and_read_back(served, redis_server):
    import redis

    served.post("/documents", json={"documents": [FREEZE, PAGER]})
    assert ask(served)["sources"][0]["document"] == "freeze.txt"
    client = redis.Redis.from_url(redis_server.url)
    keys = client.keys("rag:embedding:*")
    assert len(keys) == 1
    # Plant the pager question's vector under the freeze question's key: if the cache is
    # read, the search follows the planted vector.
    embedder = services_of(served).embedder
    planted = embedder.embed_one("who hands over the pager on monday?")
    client.set(keys[0], planted.astype("float32").tobytes())
    fresh = ask(served, {**QUESTION, "max_sources": 1})  # new parameters: no cached answer
    assert fresh["cached"] is False
    assert fresh["sources"][0]["document"] == "pager.txt"


def test_redis_outage_degrades_and_the_cache_comes_back(served, redis_server, capsys):
    served.post("/documents", json={"documents": [FREEZE, PAGER]})
    ask(served)
    assert ask(served)["cached"] is True
    assert served.get("/ready").json()["dependencies"]["redis"]["status"] == "ok"

    redis_server.kill()
    for _ in range(5):
        answer = ask(served)
        assert answer["cached"] is False and answer["sources"]
    assert capsys.readouterr().err.count("redis unavailable") == 1
    ready = served.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert ready.json()["dependencies"]["redis"]["status"] == "degraded"
    # A write while Redis is away is stored all the same (the generation it could not
    # bump is the next test's concern: this Redis comes back empty).
    written = served.post(
        "/documents",
        json={"documents": [{"text": "Freeze exceptions need a VP.", "source": "exceptions.txt"}]},
    )
    assert written.status_code == 200

    redis_server.start()  # same port, empty: the cache must find it again by itself
    deadline = time.monotonic() + 15
    while served.get("/ready").json()["status"] != "ready":
        assert time.monotonic() < deadline, "cache did not resume"
        time.sleep(0.2)
    first = ask(served)
    assert first["cached"] is False
    assert "exceptions.txt" in {source["document"] for source in first["sources"]}
    assert ask(served)["cached"] is True


def test_stale_answers_are_not_served_after_an_outage_with_writes(served, redis_server, capsys):
    """Redis survives (it was only unreachable), but the corpus changed meanwhile."""
    served.post("/documents", json={"documents": [FREEZE]})
    ask(served)
    assert ask(served)["cached"] is True
    redis_server.pause()  # unreachable, but its data is kept
    try:
        started = time.monotonic()
        assert ask(served)["cached"] is False  # times out on Redis, switches the cache off
        assert time.monotonic() - started < 3  # REDIS_TIMEOUT_SECONDS is 0.25 here
        warnings = [line for line in capsys.readouterr().err.splitlines() if "redis" in line]
        assert any("TimeoutError" in line for line in warnings), warnings
        served.post("/documents", json={"documents": [PAGER]})
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 15
    while served.get("/ready").json()["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    answer = ask(served)
    assert answer["cached"] is False
    assert {s["document"] for s in answer["sources"]} == {"freeze.txt", "pager.txt"}


def test_ready_is_503_when_chroma_is_down(make_client, tmp_path):
    chroma = ChromaServer(tmp_path / "own-chroma")
    chroma.start()
    try:
        with make_client(chroma_host="127.0.0.1", chroma_port=chroma.port) as client:
            client.post("/documents", json={"documents": [FREEZE]})
            assert client.get("/ready").status_code == 200
            chroma.stop()
            ready = client.get("/ready")
            assert ready.status_code == 503
            chroma_state = ready.json()["dependencies"]["chroma"]
            assert chroma_state == {
                "status": "down",
                "detail": "vector store heartbeat failed: unreachable",
            }
            failed = client.post("/query", json=QUESTION)
            # What kind of failure, not the cause's own text (it may name internal hosts).
            assert failed.status_code == 503
            assert failed.json()["detail"] == "vector store query failed: unreachable"
            assert client.get("/health").status_code == 200
    finally:
        chroma.stop()


def two_workers(make_client, chroma_server, redis_server, **overrides):
    """Two app instances sharing one Chroma server and one Redis, like two gunicorn workers."""
    settings = {
        "chroma_host": "127.0.0.1",
        "chroma_port": chroma_server.port,
        "redis_url": redis_server.url,
        "chroma_collection_prefix": f"shared{uuid.uuid4().hex[:8]}",
        **overrides,
    }
    return make_client(**settings), make_client(**settings)


def test_a_worker_whose_cache_is_switched_off_still_announces_its_writes(
    make_client, chroma_server, redis_server
):
    first, second = two_workers(make_client, chroma_server, redis_server, redis_retry_seconds=60)
    with first as w1, second as w2:
        w1.post("/documents", json={"documents": [FREEZE]})
        ask(w2)
        assert ask(w2)["cached"] is True
        redis_server.pause()
        try:
            ask(w1)  # times out: w1 switches its cache off (and will not probe for a minute)
        finally:
            redis_server.resume()
        w1.post("/documents", json={"documents": [PAGER]})
        answer = ask(w2)
        assert answer["cached"] is False
        assert {s["document"] for s in answer["sources"]} == {"freeze.txt", "pager.txt"}


def test_a_write_redis_never_heard_of_is_announced_when_the_worker_stops(
    make_client, chroma_server, redis_server
):
    first, second = two_workers(make_client, chroma_server, redis_server, redis_retry_seconds=60)
    with second as w2:
        with first as w1:
            w1.post("/documents", json={"documents": [FREEZE]})
            ask(w2)
            assert ask(w2)["cached"] is True
            redis_server.pause()
            try:
                w1.post("/documents", json={"documents": [PAGER]})  # the bump times out
            finally:
                redis_server.resume()
        # w1 has shut down: its last act was to announce the write.
        answer = ask(w2)
        assert answer["cached"] is False
        assert {s["document"] for s in answer["sources"]} == {"freeze.txt", "pager.txt"}


def test_two_corpora_sharing_a_redis_keep_their_answers_apart(
    make_client, chroma_server, redis_server
):
    def corpus(prefix: str):
        return make_client(
            chroma_host="127.0.0.1",
            chroma_port=chroma_server.port,
            redis_url=redis_server.url,
            chroma_collection_prefix=f"{prefix}{uuid.uuid4().hex[:8]}",
        )

    with corpus("prod") as prod, corpus("staging") as staging:
        prod.post("/documents", json={"documents": [FREEZE]})
        staging.post("/documents", json={"documents": [PAGER]})
        assert ask(prod)["sources"][0]["document"] == "freeze.txt"
        # The same question, the same parameters: the other corpus's answer is not served.
        answer = ask(staging)
        assert answer["cached"] is False and answer["sources"][0]["document"] == "pager.txt"
        assert ask(prod)["cached"] is True
        # And a write to one corpus leaves the other's cached answers alone.
        staging.post("/documents", json={"documents": [{"text": "Staging resets nightly."}]})
        assert ask(prod)["cached"] is True


def test_a_change_that_fails_to_announce_itself_during_the_probe_is_announced(redis_server):
    """The probe replaces the generation, and meanwhile an ingest in this process fails to:
    that ingest's change came after the probe's replacement, so the probe must not declare
    the cache back until a replacement covers it."""
    import redis

    from api.cache import Cache, generation_key

    cache = Cache(redis_server.url, "probe", 60, 0.25, 60)
    client = redis.Redis.from_url(redis_server.url)
    try:
        cache._up = False  # Redis went away; the probe is about to find it again
        real = cache._new_generation
        raced: list[bool] = []

        def replaced_while_an_ingest_fails() -> None:
            real()
            if not raced:  # the ingest, on another thread, just after the replacement
                raced.append(True)
                with cache._state:
                    cache._pending_bump = True
                    cache._unannounced += 1

        cache._new_generation = replaced_while_an_ingest_fails  # type: ignore[method-assign]
        first = client.get(generation_key("probe"))
        assert cache._try_resume() is False and not cache.available
        assert cache._try_resume() is True and cache.available
        assert client.get(generation_key("probe")) not in (None, first)
    finally:
        cache.close()

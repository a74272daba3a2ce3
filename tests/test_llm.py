"""Answers from the real llama.cpp server with the real SmolLM2 GGUF, whole and streamed."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest

from tests.servers import LlamaServer, free_port, wait_until

FREEZE = {
    "text": "The deploy freeze starts on the 20th of December and ends on January 3rd. "
    "During the freeze only security fixes are deployed, each approved by the on-call lead.",
    "source": "freeze.txt",
}
QUESTION = {"question": "When does the deploy freeze start?", "temperature": 0.0}


def llm_settings(server: LlamaServer, **more):
    return {
        "generator": "openai",
        "llm_base_url": server.base_url,
        "llm_gguf": server.model,
        "llm_max_tokens": 48,
        **more,
    }


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\r\n\r\n" if "\r\n" in text else "\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_a_whole_answer_from_the_llm_with_its_sources(make_client, llm_server):
    with make_client(**llm_settings(llm_server)) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        response = client.post("/query", json=QUESTION)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["generator"] == "openai" and body["answer"].strip()
        assert body["sources"][0]["document"] == "freeze.txt"
        assert 0 < body["usage"]["completion_tokens"] <= 48
        # Exact count from the GGUF vocabulary: the prompt holds the source and question.
        assert body["usage"]["prompt_tokens"] > 40
        ready = client.get("/ready").json()
        assert ready["dependencies"]["llm"] == {"status": "ok", "detail": "smollm2-135m-instruct"}


def test_stream_events_arrive_in_order(make_client, llm_server, redis_server):
    with make_client(**llm_settings(llm_server, redis_url=redis_server.url)) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        with client.stream("POST", "/query", json={**QUESTION, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            events = parse_sse(response.read().decode())
        names = [name for name, _ in events]
        assert names[0] == "sources" and names[-1] == "done"
        assert set(names[1:-1]) == {"token"} and len(names) > 3
        assert events[0][1]["sources"][0]["document"] == "freeze.txt"
        done = events[-1][1]
        assert done["cached"] is False and done["generator"] == "openai"
        assert done["usage"]["completion_tokens"] == len(names) - 2
        streamed = "".join(data["text"] for name, data in events if name == "token")

        # The same question again streams from the cache, with the same text.
        with client.stream(
            "POST", "/query", json=QUESTION, headers={"accept": "text/event-stream"}
        ) as response:
            again = parse_sse(response.read().decode())
        assert [n for n, _ in again] == ["sources", "token", "done"]
        assert again[1][1]["text"] == streamed and again[2][1]["cached"] is True
        whole = client.post("/query", json=QUESTION).json()
        assert whole["cached"] is True and whole["answer"] == streamed


@pytest.mark.parametrize("stream", [False, True])
def test_a_question_too_long_for_the_model_is_422(make_client, llm_server, stream):
    """Short in characters, long in tokens: 1,900 emoji take more of SmolLM2's 2,048-token
    window than an answer leaves. The client's to shorten (422), not the LLM's fault (a
    503 from its refusal, as before), and no fallback answers it from no sources."""
    settings = llm_settings(llm_server, llm_fallback="extractive")
    with make_client(**settings) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        response = client.post("/query", json={"question": "😀" * 1900, "stream": stream})
    assert response.status_code == 422
    assert "too long for the model" in response.json()["detail"]


def test_first_token_comes_well_before_the_last(make_client, llm_server):
    with make_client(**llm_settings(llm_server, llm_max_tokens=200)) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        body = {
            "question": "Write a long explanation of the deploy freeze rules.",
            "temperature": 0.0,
            "stream": True,
        }
        start = time.perf_counter()
        first = None
        with client.stream("POST", "/query", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("event: token") and first is None:
                    first = time.perf_counter() - start
        total = time.perf_counter() - start
    assert first is not None
    assert first < total / 3, (first, total)


def test_client_disconnect_stops_generation(tmp_path, embedder, llm_server):
    """Over a real socket: the LLM server stops producing tokens once the client leaves."""
    import threading

    import uvicorn

    from api.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, **llm_settings(llm_server, llm_max_tokens=400))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, embedder), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        httpx.post(f"{base}/documents", json={"documents": [FREEZE]}, timeout=60)
        body = {
            "question": "Tell a very long story about a deploy freeze.",
            "stream": True,
            "temperature": 0.0,  # greedy: the same answer both times
        }

        def tokens(most: int | None) -> int:
            count = 0
            with httpx.stream("POST", f"{base}/query", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    count += line.startswith("event: token")
                    if count == most:
                        break
            return count

        # The control: read to the end, this answer runs long, and how long the model
        # takes for what comes after the fifth token is known.
        started = time.monotonic()
        produced = tokens(None)
        rest = (time.monotonic() - started) * (produced - 5) / produced
        assert rest > 2, (produced, rest)  # else the rest of this test would prove nothing
        assert tokens(5) == 5  # and now the client leaves after five tokens

        # The LLM server must go idle in much less time than finishing the answer (that
        # nobody will read) would take.
        def idle() -> bool:
            before = llm_server.cpu_ticks()
            time.sleep(0.5)
            return llm_server.cpu_ticks() - before <= 5  # ticks are 10 ms: 10% of a core

        wait_until(idle, rest / 2, "the LLM idle")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def own_llm(tmp_path):
    server = LlamaServer(tmp_path / "own-llama")
    server.start()
    yield server
    server.stop()


def test_llm_killed_gives_503_with_a_clear_detail(make_client, own_llm):
    with make_client(**llm_settings(own_llm, llm_retries=0)) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        assert client.post("/query", json=QUESTION).status_code == 200
        own_llm.kill()
        for body in (
            QUESTION | {"question": "Who approves fixes?"},
            QUESTION | {"question": "Who approves fixes?", "stream": True},
        ):
            response = client.post("/query", json=body)
            assert response.status_code == 503
            assert "LLM server" in response.json()["detail"]
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["dependencies"]["llm"]["status"] == "down"


def test_llm_killed_falls_back_to_extractive_when_configured(make_client, own_llm, redis_server):
    settings = llm_settings(own_llm, llm_fallback="extractive", redis_url=redis_server.url)
    with make_client(**settings) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        # The cache works: the model's answer is served from it the second time.
        other = QUESTION | {"question": "Who approves fixes during the freeze?"}
        assert client.post("/query", json=other).json()["cached"] is False
        assert client.post("/query", json=other).json()["cached"] is True
        own_llm.kill()
        body = client.post("/query", json=QUESTION).json()
        assert body["generator"] == "extractive" and body["cached"] is False
        assert "20th of December" in body["answer"] and "[1]" in body["answer"]
        # Fallback answers are not cached: once the LLM is back it answers again.
        again = client.post("/query", json=QUESTION).json()
        assert again["generator"] == "extractive" and again["cached"] is False
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["dependencies"]["llm"]["status"] == "degraded"


def test_unreachable_llm_at_start_up_still_starts_and_ready_says_why(make_client):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with make_client(generator="openai", llm_base_url=url) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503
        llm = ready.json()["dependencies"]["llm"]
        assert llm["status"] == "down" and url in llm["detail"]
        client.post("/documents", json={"documents": [FREEZE]})
        response = client.post("/query", json=QUESTION)
        assert response.status_code == 503 and url in response.json()["detail"]


class _Misbehaving(BaseHTTPRequestHandler):
    """An OpenAI-compatible server at fault, for what llama.cpp cannot be made to do: an
    error answer with internals in its body, or events of the wrong shape. It records the
    Authorization header each request carried."""

    mode = "error"
    seen_auth: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen_auth.append(self.headers.get("authorization"))
        if self.mode == "error":
            body = b'{"error": "db password is hunter2, see /srv/internal"}'
            self.send_response(500)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"delta": {"content": "Fine"}}]}\n\n')
        if self.mode == "shape":
            self.wfile.write(b"data: [1, 2, 3]\n\n")  # JSON, but not an object
        elif self.mode == "failed":  # how vLLM and OpenAI say the answer broke off
            self.wfile.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
        elif self.mode == "split":  # a surrogate pair split between two events
            self.wfile.write(b'data: {"choices": [{"delta": {"content": " \\ud83d"}}]}\n\n')
            self.wfile.write(b'data: {"choices": [{"delta": {"content": "\\ude00"}}]}\n\n')
            self.wfile.write(b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n')
        if self.mode != "cut":  # "cut": the stream just ends, with neither [DONE] nor a reason
            self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def misbehaving():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Misbehaving.seen_auth = []
    yield server
    server.shutdown()


def _faulty_llm(misbehaving, userinfo: str = "", **more):
    port = misbehaving.server_address[1]
    return {"generator": "openai", "llm_base_url": f"http://{userinfo}127.0.0.1:{port}/v1", **more}


def test_an_llm_error_is_a_503_that_leaks_neither_its_body_nor_credentials(
    make_client, misbehaving, capsys
):
    _Misbehaving.mode = "error"
    with make_client(**_faulty_llm(misbehaving, "svc:s3cret@")) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        response = client.post("/query", json=QUESTION)
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "answered 500" in detail and "127.0.0.1" in detail
    assert "hunter2" not in detail and "s3cret" not in detail
    assert "hunter2" in capsys.readouterr().err  # the operator still sees it, in the log
    assert _Misbehaving.seen_auth == ["Basic c3ZjOnMzY3JldA=="]  # the URL's svc:s3cret, sent


@pytest.mark.parametrize("stream", [False, True])
def test_events_of_the_wrong_shape_are_the_llms_fault_not_a_500(make_client, misbehaving, stream):
    _Misbehaving.mode = "shape"
    with make_client(**_faulty_llm(misbehaving, llm_api_key="key-123")) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        response = client.post("/query", json=QUESTION | {"stream": stream})
    assert _Misbehaving.seen_auth == ["Bearer key-123"]  # LLM_API_KEY, as a bearer token
    if not stream:
        assert response.status_code == 503
        assert "malformed event" in response.json()["detail"]
        return
    assert response.status_code == 200  # the stream had begun: it ends with an error event
    events = parse_sse(response.text)
    assert [name for name, _ in events][-1] == "error"
    assert "malformed event" in events[-1][1]["detail"]


@pytest.mark.parametrize("mode", ["failed", "cut"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_short_is_an_error_and_never_cached(
    make_client, misbehaving, redis_server, mode, stream
):
    """An error event after the first words, or a stream that ends with neither [DONE] nor
    a finish reason: the words so far are not an answer. Before, either was served (and
    cached for an hour) as if complete."""
    _Misbehaving.mode = mode
    with make_client(**_faulty_llm(misbehaving, redis_url=redis_server.url)) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        for _ in range(2):  # the second ask finds nothing cached
            response = client.post("/query", json=QUESTION | {"stream": stream})
            if stream:
                events = parse_sse(response.text)
                assert [name for name, _ in events][-1] == "error", events
                assert "mid-answer" in events[-1][1]["detail"]
            else:
                assert response.status_code == 503
                assert "mid-answer" in response.json()["detail"]
    assert len(_Misbehaving.seen_auth) == 2


def test_a_surrogate_pair_split_between_events_is_replaced_not_a_failure(
    make_client, misbehaving, redis_server
):
    _Misbehaving.mode = "split"
    with make_client(**_faulty_llm(misbehaving, redis_url=redis_server.url)) as client:
        client.post("/documents", json={"documents": [FREEZE]})
        first = client.post("/query", json=QUESTION)
        again = client.post("/query", json=QUESTION)
    assert first.status_code == 200 and first.json()["answer"] == "Fine \ufffd\ufffd"
    assert again.json()["cached"] is True and again.json()["answer"] == first.json()["answer"]

"""Answering a question: cache, embed, retrieve, generate — whole or as a stream of events.

The model and the vector store are synchronous and run in the thread pool; generation is
async end to end, so a slow LLM never holds a worker's event loop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson
import structlog
from fastapi.concurrency import run_in_threadpool
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from api import telemetry
from api.cache import Cache, answer_digest, answer_key, embedding_key, normalize_question
from api.embeddings import Embedder, Vectors
from api.generation import Completion, Generator, GeneratorUnavailable, Usage
from api.store import Hit, VectorStore
from api.telemetry import metrics

log = structlog.get_logger(__name__)

# Cache lookups, counted on every question.
_ANSWER_HIT = telemetry.counted(metrics.CACHE_REQUESTS, layer="answer", result="hit")
_ANSWER_MISS = telemetry.counted(metrics.CACHE_REQUESTS, layer="answer", result="miss")
_EMBEDDING_HIT = telemetry.counted(metrics.CACHE_REQUESTS, layer="embedding", result="hit")
_EMBEDDING_MISS = telemetry.counted(metrics.CACHE_REQUESTS, layer="embedding", result="miss")


@dataclass(frozen=True)
class Answer:
    """A freshly generated answer (a cached one is served from its stored record)."""

    answer: str
    sources: list[Hit]
    processing_time: float
    generator: str
    usage: Usage | None


@dataclass(frozen=True)
class Event:
    """One server-sent event: `sources`, `token`, `done` or `error`."""

    name: str
    data: dict[str, Any]


@dataclass
class _Opened:
    """A question ready to be answered: from the cache, or by a started completion."""

    started: float
    key: str | None
    cached: bytes | None = None  # the stored record: the answer's JSON body, less timing
    record: dict[str, Any] | None = None  # the same, parsed (for a stream)
    completion: Completion | None = None


class QueryService:
    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        cache: Cache | None,
        generator: Generator,
        fallback: Generator | None = None,
    ) -> None:
        self._embedder = embedder
        self._store = store
        self._cache = cache
        self._generator = generator
        self._fallback = fallback

    # --- retrieval
    def embed_question(self, question: str) -> Vectors:
        text = normalize_question(question)
        key = embedding_key(self._embedder.model_id, text)
        if self._cache is not None:
            hit = self._cache.get_embedding(key)
            (_EMBEDDING_MISS if hit is None else _EMBEDDING_HIT).inc()
            if hit is not None:
                return hit
        with telemetry.stage("embed", metrics.EMBED_DURATION, {"kind": "query"}):
            vector = self._embedder.embed_one(text)
        if self._cache is not None:
            self._cache.put_embedding(key, vector)
        return vector

    def retrieve(self, question: str, max_sources: int) -> list[Hit]:
        vector = self.embed_question(question)
        with telemetry.stage(
            "retrieve", metrics.RETRIEVE_DURATION, attributes={"rag.top_k": max_sources}
        ) as span:
            hits = self._store.search(vector, max_sources)
            span.set_attribute("rag.chunks_returned", len(hits))
        return hits

    # --- answering
    async def answer_json(self, question: str, max_sources: int, temperature: float) -> bytes:
        """The answer as the JSON body of a `QueryResponse`. A cached answer is its stored
        record with the timing put in front, never parsed or re-rendered: on the cached
        path that is most of the work left (docs/BENCHMARKS.md). A stream's events are
        built from the parsed record instead."""
        opened = await self._open(question, max_sources, temperature)
        if opened.cached is not None:
            elapsed = round(time.perf_counter() - opened.started, 6)
            return b'{"processing_time":%r,"cached":true,%s' % (elapsed, opened.cached[1:])
        assert opened.completion is not None
        try:
            text = await _collect(opened.completion)
        except GeneratorUnavailable:
            if self._fallback is None:
                raise
            log.warning("generation failed mid-answer, answering extractively")
            sources = opened.completion.sources
            opened.completion = await _start(self._fallback, question, sources, temperature)
            text = await _collect(opened.completion)
        answer = await self._finish(opened, text)
        return orjson.dumps({**_done(answer), **_public(answer)})

    async def events(
        self, question: str, max_sources: int, temperature: float
    ) -> AsyncIterator[Event]:
        """Opens the answer first, so a generator that cannot start raises here, before any
        event is sent (and the client gets a 503, not a broken stream)."""
        opened = await self._open(question, max_sources, temperature, parse=True)
        return self._stream(opened)

    async def _stream(self, opened: _Opened) -> AsyncIterator[Event]:
        if opened.record is not None:
            record = opened.record
            yield Event("sources", {"sources": record["sources"]})
            yield Event("token", {"text": record["answer"]})
            timing = {"processing_time": round(time.perf_counter() - opened.started, 6)}
            yield Event(
                "done", {**timing, "cached": True, "generator": record["generator"], "usage": None}
            )
            return
        completion = opened.completion
        assert completion is not None
        yield Event("sources", {"sources": [public_source(h) for h in completion.sources]})
        parts: list[str] = []
        try:
            async for delta in completion.deltas:
                parts.append(delta)
                yield Event("token", {"text": delta})
        except GeneratorUnavailable as exc:
            log.warning("generation failed mid-stream", error=str(exc))
            telemetry.count(metrics.ERRORS, type="llm_stream")
            yield Event("error", {"detail": str(exc)})
            return
        finally:
            # Also runs when the client goes away: closing the upstream response is what
            # tells the LLM server to stop generating.
            await completion.close()
        yield Event("done", _done(await self._finish(opened, "".join(parts))))

    async def _open(
        self, question: str, max_sources: int, temperature: float, parse: bool = False
    ) -> _Opened:
        started = time.perf_counter()
        key = None
        if self._cache is not None:
            params = {
                "record": 2,  # the record's format: older records are simply not found
                "max_sources": max_sources,
                "temperature": temperature,
                "embedder": self._embedder.model_id,
                "generator": self._generator.id,
            }
            digest = answer_digest(question, params)
            found = await self._cache.lookup_answer(digest)
            if found is not None:
                generation, record = found
                key = answer_key(self._cache.namespace, generation, digest)
                # A JSON answer serves the record's bytes; a stream needs it parsed.
                hit, parsed = _whole(record), None
                if hit and parse:
                    parsed = _parsed(record)
                    hit = parsed is not None
                (_ANSWER_HIT if hit else _ANSWER_MISS).inc()
                if hit:
                    telemetry.note(cached=True)
                    return _Opened(started, key, cached=record, record=parsed)
        telemetry.note(cached=False)
        sources = await run_in_threadpool(self.retrieve, question, max_sources)
        try:
            completion = await _start(self._generator, question, sources, temperature)
        except GeneratorUnavailable as exc:
            if self._fallback is None:
                raise
            log.warning("generator unavailable, answering extractively", error=str(exc))
            completion = await _start(self._fallback, question, sources, temperature)
        telemetry.note(generator=completion.generator)
        return _Opened(started, key, completion=completion)

    async def _finish(self, opened: _Opened, text: str) -> Answer:
        completion = opened.completion
        assert completion is not None
        answer = Answer(
            text,
            completion.sources,
            time.perf_counter() - opened.started,
            completion.generator,
            completion.usage,
        )
        # A fallback answer is not cached: once the LLM is back it should answer again.
        if (
            opened.key is not None
            and self._cache is not None
            and completion.generator == self._generator.name
        ):
            # A cached answer spent no tokens: its record says usage null.
            record = orjson.dumps({**_public(answer), "usage": None})
            await run_in_threadpool(self._cache.put_answer, opened.key, record)
        if answer.usage is not None:
            log.info(
                "answer generated",
                generator=answer.generator,
                prompt_tokens=answer.usage.prompt_tokens,
                completion_tokens=answer.usage.completion_tokens,
            )
        return answer


async def _start(
    generator: Generator, question: str, sources: list[Hit], temperature: float
) -> Completion:
    """Start a generation inside a `generate` span (the LLM request becomes its child) and
    time it: first text, whole answer, tokens."""
    started = time.perf_counter()
    span = telemetry.tracer().start_span(
        "generate",
        attributes={
            "rag.generator": generator.id,
            "rag.sources": len(sources),
            "rag.temperature": temperature,
        },
    )
    try:
        with trace.use_span(span, end_on_exit=False):
            completion = await generator.start(question, sources, temperature)
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        span.end()
        raise
    ended = False

    def end(error: BaseException | None = None) -> None:
        nonlocal ended
        if ended:
            return
        ended = True
        telemetry.observe(
            metrics.GENERATE_DURATION, time.perf_counter() - started, generator=completion.generator
        )
        if (usage := completion.usage) is not None:
            span.set_attribute("rag.prompt_tokens", usage.prompt_tokens)
            span.set_attribute("rag.completion_tokens", usage.completion_tokens)
            telemetry.count(metrics.LLM_TOKENS, usage.prompt_tokens, kind="prompt")
            telemetry.count(metrics.LLM_TOKENS, usage.completion_tokens, kind="completion")
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    async def deltas() -> AsyncIterator[str]:
        first = True
        try:
            async for delta in completion.deltas:
                if first:
                    first = False
                    telemetry.observe(
                        metrics.TIME_TO_FIRST_TOKEN,
                        time.perf_counter() - started,
                        generator=completion.generator,
                    )
                yield delta
        except GeneratorUnavailable as exc:
            end(exc)
            raise
        end()

    async def close() -> None:
        await completion.close()
        end()

    return replace(completion, deltas=deltas(), close=close)


# A record is `{"answer":…,"sources":…,"generator":…,"usage":null}`, rendered by orjson.
_RECORD_START, _RECORD_END = b'{"answer":', b',"usage":null}'


def _whole(record: bytes | None) -> bool:
    """Whether a record looks whole. Its format version is part of its key, so anything
    else found there was cut short or written by something other than this service:
    a miss, not an answer."""
    return bool(record and record.startswith(_RECORD_START) and record.endswith(_RECORD_END))


def _parsed(record: bytes | None) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(record or b"")
        fields = (parsed["answer"], parsed["sources"], parsed["generator"])
        if all(isinstance(f, t) for f, t in zip(fields, (str, list, str), strict=True)):
            return dict(parsed)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return None


def public_source(hit: Hit) -> dict[str, Any]:
    """A retrieved chunk as the API shows it (`schemas.Source`)."""
    return {
        "document": hit.source,
        "content": hit.content,
        "score": hit.score,
        "document_id": hit.doc_id,
        "title": hit.title,
        "chunk": hit.chunk,
    }


def _public(answer: Answer) -> dict[str, Any]:
    """The rest of a `QueryResponse` besides `_done`'s fields: with `usage` null, what a
    cached record stores."""
    return {
        "answer": answer.answer,
        "sources": [public_source(h) for h in answer.sources],
        "generator": answer.generator,
    }


async def _collect(completion: Completion) -> str:
    try:
        return "".join([delta async for delta in completion.deltas])
    finally:
        await completion.close()


def _done(answer: Answer) -> dict[str, Any]:
    return {
        "processing_time": round(answer.processing_time, 6),
        "cached": False,
        "generator": answer.generator,
        "usage": asdict(answer.usage) if answer.usage is not None else None,
    }

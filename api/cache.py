"""Redis cache for answers and query embeddings that never makes a query fail.

Answer keys carry the corpus generation, a random token replaced on every ingest and
delete, so a changed corpus makes every older answer unreachable at once (the TTL then
reclaims them). When Redis stops answering the cache switches itself off after one
warning, a background probe waits for Redis to return, and on return the generation is
replaced: writes made while Redis was away could not announce themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import unicodedata
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import orjson
import redis
import structlog
from opentelemetry.trace import Span, SpanKind
from starlette.concurrency import run_in_threadpool

from api import telemetry
from api.embeddings import Vectors
from api.redis_script import ScriptCaller

log = structlog.get_logger(__name__)


def generation_key(namespace: str) -> str:
    """Where a corpus's generation lives. The namespace is the corpus's name
    (CHROMA_COLLECTION_PREFIX): deployments sharing a Redis but not a corpus must not
    serve each other's answers, nor have each other's writes invalidate them."""
    return f"{namespace}:corpus:generation"


def answer_prefix(namespace: str) -> str:
    return f"{namespace}:answer:"


def normalize_question(question: str) -> str:
    """Questions that differ only in case, Unicode form or spacing share cache entries.
    The model's tokenizer lowercases too, so the normalised text embeds identically."""
    return " ".join(unicodedata.normalize("NFKC", question).casefold().split())


def answer_digest(question: str, params: dict[str, Any]) -> str:
    blob = orjson.dumps([normalize_question(question), params], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


def answer_key(namespace: str, generation: str, digest: str) -> str:
    return f"{answer_prefix(namespace)}{generation}:{digest}"


# One round trip for the cached path: read (or create) the generation and the answer
# stored under it. Redis runs scripts atomically.
_LOOKUP = """
local generation = redis.call('GET', KEYS[1])
if not generation then
  redis.call('SET', KEYS[1], ARGV[2], 'NX')
  generation = redis.call('GET', KEYS[1])
end
return {generation, redis.call('GET', ARGV[3] .. generation .. ':' .. ARGV[1])}
"""


def _new_token() -> str:
    """A corpus generation: unique, not secret, so no urandom system call per lookup."""
    return f"{random.getrandbits(128):032x}"


def embedding_key(model_id: str, question: str) -> str:
    """Shared by every corpus: a question's vector depends on the model alone."""
    digest = hashlib.sha256(normalize_question(question).encode()).hexdigest()
    return f"rag:embedding:{model_id}:{digest}"


class Cache:
    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_seconds: int,
        timeout_seconds: float,
        retry_seconds: float,
    ) -> None:
        self.namespace = namespace
        self._generation_key = generation_key(namespace)
        self._lookup_keys = [self._generation_key.encode()]
        self._answer_prefix = answer_prefix(namespace).encode()
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            health_check_interval=30,
        )
        # The cached path runs on the event loop: a blocking call on the thread pool
        # costs two thread hand-offs (~100 µs of a ~500 µs answer), redis-py's asyncio
        # client about a third of the answer's CPU (api/redis_script.py).
        self._lookup = ScriptCaller(url, _LOOKUP, connect_timeout=timeout_seconds)
        self._timeout = timeout_seconds
        pool = self._redis.connection_pool.connection_kwargs
        server: dict[str, str | int] = {
            "db.system.name": "redis",
            "server.address": str(pool.get("host", "")),
            "server.port": int(pool.get("port", 6379)),
        }
        # Each operation's span name and attributes, made once (the tracer copies them).
        self._span_args = {
            operation: (f"redis {operation}", {**server, "db.operation.name": operation})
            for operation in ("EVALSHA", "GET", "SET")
        }
        self._ttl = ttl_seconds
        self._retry = retry_seconds
        self._up = True
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._probe: threading.Thread | None = None
        # A corpus change that could not be announced; retried until it is.
        self._pending_bump = False
        self._unannounced = 0  # changes whose announcement failed, ever

    @property
    def available(self) -> bool:
        return self._up

    async def aclose(self) -> None:
        try:
            await self._lookup.aclose()
        finally:
            # Off the event loop: close() joins the probe and may write to Redis.
            await run_in_threadpool(self.close)

    def close(self) -> None:
        self._stop.set()
        if self._probe is not None:
            self._probe.join(timeout=self._retry + 1)
        if self._pending_bump:
            # Last chance: no probe will run after this process has gone.
            try:
                self._new_generation()
            except redis.RedisError as exc:
                log.error(
                    "corpus change not announced to redis: cached answers may be stale "
                    "until they expire",
                    error=str(exc),
                    ttl_seconds=self._ttl,
                )
        self._redis.close()

    # --- the public operations; each degrades to "no cache" instead of raising
    async def lookup_answer(self, digest: str) -> tuple[str, bytes | None] | None:
        """(corpus generation, the answer record cached under it or None); None if Redis
        is away. Records are stored and returned as the bytes they were written as."""
        if not self._up:
            return None
        try:
            # Inside the span, so a timeout marks it failed; a call cancelled by the
            # deadline closes its connection.
            with self._span("EVALSHA"):
                async with asyncio.timeout(self._timeout):
                    found = await self._lookup(
                        self._lookup_keys,
                        [digest.encode(), _new_token().encode(), self._answer_prefix],
                    )
        except (redis.RedisError, TimeoutError) as exc:
            self._went_down(exc)
            return None
        generation, record = found
        return generation.decode(), record or None

    def bump_generation(self) -> None:
        """Tried even while the cache is switched off: a change other workers do not hear
        of lets them serve stale answers. If it fails, the probe retries it."""
        try:
            with self._span("SET"):
                self._new_generation()
        except redis.RedisError as exc:
            with self._state:
                self._pending_bump = True
                self._unannounced += 1
            self._went_down(exc)

    def put_answer(self, key: str, record: bytes) -> None:
        self._guarded("SET", lambda: self._redis.set(key, record, ex=self._ttl))

    def get_embedding(self, key: str) -> Vectors | None:
        raw = self._guarded("GET", lambda: self._redis.get(key))
        return np.frombuffer(raw, dtype=np.float32).copy() if raw else None

    def put_embedding(self, key: str, vector: Vectors) -> None:
        data = np.asarray(vector, dtype=np.float32).tobytes()
        self._guarded("SET", lambda: self._redis.set(key, data, ex=self._ttl))

    def ping(self) -> bool:
        """Used by /ready: a real round trip even while the cache is switched off."""
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def _new_generation(self) -> None:
        """Every answer cached so far becomes unreachable (the TTL reclaims them)."""
        self._redis.set(self._generation_key, _new_token())

    # --- failure handling
    def _span(self, operation: str) -> AbstractContextManager[Span]:
        """A client span per Redis call. Made here rather than by opentelemetry's redis
        instrumentation, which sets seven attributes per call and cost 75 µs of a ~800 µs
        cached answer (docs/BENCHMARKS.md); these four are what a trace needs. Not made
        current: nothing happens inside a Redis call that would be its child."""
        name, attributes = self._span_args[operation]
        # Positional: the compiled tracer parses them for less than keywords.
        return telemetry.tracer().start_span(name, None, SpanKind.CLIENT, attributes)

    def _guarded(self, operation: str, op: Any) -> Any:
        if not self._up:
            return None
        try:
            with self._span(operation):
                return op()
        except redis.RedisError as exc:
            self._went_down(exc)
            return None

    def _went_down(self, exc: Exception) -> None:
        with self._state:
            if not self._up:
                return
            self._up = False
            error = str(exc) or type(exc).__name__  # a TimeoutError says nothing itself
            log.warning("redis unavailable, serving without cache", error=error)
            self._probe = threading.Thread(
                target=self._wait_for_redis, name="redis-probe", daemon=True
            )
            self._probe.start()

    def _wait_for_redis(self) -> None:
        while not self._stop.wait(self._retry):
            if self._try_resume():
                log.info("redis is back, cache resumed")
                return

    def _try_resume(self) -> bool:
        """Any worker's writes during the outage may be unannounced: replace the generation
        before trusting a cached answer again. A change in this process whose own
        announcement failed after that replacement began is not covered by it: then try
        again."""
        with self._state:
            seen = self._unannounced
        try:
            self._redis.ping()
            self._new_generation()
        except redis.RedisError:
            return False
        with self._state:
            if self._unannounced != seen:
                return False
            self._up = True
            self._pending_bump = False
        return True

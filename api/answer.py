"""Answering a question: cache, embed, retrieve, generate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from api.cache import Cache, answer_key, embedding_key, normalize_question
from api.embeddings import Embedder, Vectors
from api.generation import Generator
from api.store import Hit, VectorStore


@dataclass(frozen=True)
class Answer:
    answer: str
    sources: list[Hit]
    cached: bool
    processing_time: float


class QueryService:
    def __init__(
        self, embedder: Embedder, store: VectorStore, cache: Cache | None, generator: Generator
    ) -> None:
        self._embedder = embedder
        self._store = store
        self._cache = cache
        self._generator = generator

    def embed_question(self, question: str) -> Vectors:
        text = normalize_question(question)
        key = embedding_key(self._embedder.model_id, text)
        if self._cache is not None and (hit := self._cache.get_embedding(key)) is not None:
            return hit
        vector = self._embedder.embed_one(text)
        if self._cache is not None:
            self._cache.put_embedding(key, vector)
        return vector

    def retrieve(self, question: str, max_sources: int) -> list[Hit]:
        return self._store.search(self.embed_question(question), max_sources)

    def answer(self, question: str, max_sources: int, temperature: float) -> Answer:
        started = time.perf_counter()
        key = None
        if self._cache is not None and (generation := self._cache.generation()) is not None:
            params = {
                "max_sources": max_sources,
                "temperature": temperature,
                "embedder": self._embedder.model_id,
                "generator": self._generator.id,
            }
            key = answer_key(generation, question, params)
            if (cached := self._cache.get_answer(key)) is not None:
                return Answer(
                    cached["answer"],
                    [Hit(**s) for s in cached["sources"]],
                    True,
                    time.perf_counter() - started,
                )
        sources = self.retrieve(question, max_sources)
        text = "".join(self._generator.stream(question, sources, temperature))
        if key is not None and self._cache is not None:
            self._cache.put_answer(key, {"answer": text, "sources": [asdict(s) for s in sources]})
        return Answer(text, sources, False, time.perf_counter() - started)

"""The process-wide objects a request needs, built once per worker process."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from api.answer import QueryService
from api.cache import Cache
from api.config import Settings
from api.embeddings import Embedder
from api.generation import build_generator
from api.ingest import Ingestor
from api.store import StoreUnavailable, VectorStore

log = structlog.get_logger(__name__)


@dataclass
class Services:
    settings: Settings
    embedder: Embedder
    store: VectorStore
    cache: Cache | None
    ingestor: Ingestor
    queries: QueryService

    @classmethod
    def start(cls, settings: Settings, embedder: Embedder | None = None) -> Services:
        embedder = embedder or Embedder(
            settings.model_dir, settings.embed_threads, settings.embed_batch_size
        )
        store = VectorStore(settings)
        cache = (
            Cache(
                settings.redis_url,
                settings.cache_ttl_seconds,
                settings.redis_timeout_seconds,
                settings.redis_retry_seconds,
            )
            if settings.redis_url
            else None
        )
        ingestor = Ingestor(
            embedder, store, cache, settings.chunk_tokens, settings.chunk_overlap_tokens
        )
        generator = build_generator(settings.generator, settings.answer_sentences)
        return cls(
            settings,
            embedder,
            store,
            cache,
            ingestor,
            QueryService(embedder, store, cache, generator),
        )

    def seed_if_empty(self) -> None:
        """A newcomer's first query should find something: an empty store gets DOCUMENTS_DIR."""
        if not self.settings.ingest_on_start or not self.settings.documents_dir.is_dir():
            return
        try:
            if self.store.count_documents() > 0:
                return
            report = self.ingestor.reload(self.settings.documents_dir)
        except StoreUnavailable as exc:
            log.warning("initial ingest skipped: vector store unavailable", error=str(exc))
            return
        log.info(
            "initial ingest",
            directory=str(self.settings.documents_dir),
            created=len(report.created),
            errors=report.errors,
        )

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.store.close()

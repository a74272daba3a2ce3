"""The process-wide objects a request needs, built once per worker process."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import structlog

from api.answer import QueryService
from api.cache import Cache
from api.config import Settings
from api.embeddings import Embedder
from api.generation import ExtractiveGenerator, Generator
from api.ingest import Ingestor
from api.loaders import MAX_PARSERS
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
    generator: Generator
    # Uploads waiting for a PDF or HTML parser wait here, not in a thread of the pool.
    parsers: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(MAX_PARSERS)
    )

    @classmethod
    def start(cls, settings: Settings, embedder: Embedder | None = None) -> Services:
        embedder = embedder or Embedder(
            settings.model_dir,
            settings.embed_precision,
            settings.embed_threads,
            settings.embed_batch_size,
        )
        store = VectorStore(settings, embedder.model_id)
        cache = (
            Cache(
                settings.redis_url,
                settings.chroma_collection_prefix,
                settings.cache_ttl_seconds,
                settings.redis_timeout_seconds,
                settings.redis_retry_seconds,
            )
            if settings.redis_url
            else None
        )
        ingestor = Ingestor(embedder, store, cache, settings)
        generator, fallback = build_generators(settings)
        queries = QueryService(embedder, store, cache, generator, fallback)
        return cls(settings, embedder, store, cache, ingestor, queries, generator)

    def prepare_store(self) -> None:
        """Fail fast on a store built with another model; fill an empty store from
        DOCUMENTS_DIR so a newcomer's first query finds something. An unreachable Chroma
        server is not fatal: /ready reports it until it comes."""
        try:
            count = self.store.count_documents()
            settings = self.settings
            if count or not settings.ingest_on_start or not settings.documents_dir.is_dir():
                return
            report = self.ingestor.reload(settings.documents_dir)
        except StoreUnavailable as exc:
            log.warning("vector store unavailable at start-up", error=str(exc))
            return
        log.info(
            "initial ingest",
            directory=str(settings.documents_dir),
            created=len(report.created),
            errors=report.errors,
        )

    async def aclose(self) -> None:
        await self.generator.aclose()
        if self.cache is not None:
            await self.cache.aclose()
        self.store.close()


def build_generators(settings: Settings) -> tuple[Generator, Generator | None]:
    """The configured generator, and the extractive one as its fallback if asked for."""
    extractive = ExtractiveGenerator(settings.answer_sentences)
    if settings.generator == "extractive":
        return extractive, None
    from api.llm import OpenAIGenerator
    from api.prompt import estimate_tokens, gguf_token_counter

    count = gguf_token_counter(settings.llm_gguf) if settings.llm_gguf else estimate_tokens
    fallback = extractive if settings.llm_fallback == "extractive" else None
    return OpenAIGenerator(settings, count), fallback

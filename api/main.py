"""The ASGI application factory (`api.main:create_app()` for gunicorn)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api import __version__
from api.config import Settings, get_settings
from api.embeddings import Embedder
from api.generation import GeneratorUnavailable
from api.ingest import DocumentsDirMissing, EmptyDocument
from api.loaders import UnreadableDocument, UnsupportedFileType
from api.middleware import BodySizeLimit
from api.routers import documents, health, query
from api.services import Services
from api.store import EmbeddingModelMismatch, StoreUnavailable
from api.telemetry import configure_logging

log = structlog.get_logger(__name__)


def _error(status: int):  # type: ignore[no-untyped-def]
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own handler echoes the offending input, which may not even be JSON
    (NaN, lone surrogates); the type, location and message are what a client needs."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", path=request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app(settings: Settings | None = None, embedder: Embedder | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level, settings.log_format)
        services = await run_in_threadpool(Services.start, settings, embedder)
        app.state.services = services
        await run_in_threadpool(services.prepare_store)
        log.info(
            "ready to serve",
            store=services.store.location,
            cache="redis" if services.cache else "off",
            model=services.embedder.model_id,
        )
        try:
            yield
        finally:
            await services.aclose()

    app = FastAPI(title="RAG API", version=__version__, lifespan=lifespan)
    app.include_router(health.router)
    app.include_router(documents.router)
    app.include_router(query.router)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(UnsupportedFileType, _error(415))
    app.add_exception_handler(UnreadableDocument, _error(422))
    app.add_exception_handler(EmptyDocument, _error(422))
    app.add_exception_handler(DocumentsDirMissing, _error(409))
    app.add_exception_handler(StoreUnavailable, _error(503))
    app.add_exception_handler(EmbeddingModelMismatch, _error(503))
    app.add_exception_handler(GeneratorUnavailable, _error(503))
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    return app

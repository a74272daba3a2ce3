"""The ASGI application factory (`api.main:create_app()` for gunicorn)."""

from __future__ import annotations

import gc
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import __version__, telemetry
from api.config import Settings, get_settings
from api.embeddings import Embedder
from api.generation import GeneratorUnavailable
from api.ingest import DocumentsDirMissing, EmptyDocument
from api.loaders import UnreadableDocument, UnsupportedFileType
from api.middleware import BodySizeLimit, RequestTelemetry
from api.prompt import QuestionTooLong
from api.routers import documents, health, query
from api.routers import metrics as metrics_router
from api.services import Services
from api.store import EmbeddingModelMismatch, StoreUnavailable
from api.telemetry import configure_logging, flusher, metrics

log = structlog.get_logger(__name__)


def _error(status: int, kind: str):  # type: ignore[no-untyped-def]
    rejects_a_document = kind in _REJECTED_DOCUMENTS

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        telemetry.count(metrics.ERRORS, type=kind)
        if rejects_a_document:
            telemetry.count(metrics.INGESTED, result="rejected")
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own handler echoes the offending input, which may not even be JSON
    (NaN, lone surrogates); the type, location and message are what a client needs."""
    assert isinstance(exc, RequestValidationError)
    telemetry.count(metrics.ERRORS, type="validation")
    errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    telemetry.count(metrics.ERRORS, type=f"http_{exc.status_code}")
    return await http_exception_handler(request, exc)


async def _last_resort(request: Request, exc: Exception) -> JSONResponse:
    """A failure of the request telemetry itself (RequestTelemetry answers the rest)."""
    telemetry.count(metrics.ERRORS, type="internal")
    log.exception("unhandled error outside the request's telemetry", path=request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


_REJECTED_DOCUMENTS = {"unsupported_file_type", "unreadable_document", "empty_document"}
_ERRORS: list[tuple[type[Exception], int, str]] = [
    (UnsupportedFileType, 415, "unsupported_file_type"),
    (UnreadableDocument, 422, "unreadable_document"),
    (EmptyDocument, 422, "empty_document"),
    (QuestionTooLong, 422, "question_too_long"),
    (DocumentsDirMissing, 409, "documents_dir_missing"),
    (StoreUnavailable, 503, "store_unavailable"),
    (EmbeddingModelMismatch, 503, "embedding_model_mismatch"),
    (GeneratorUnavailable, 503, "llm_unavailable"),
]


def create_app(settings: Settings | None = None, embedder: Embedder | None = None) -> FastAPI:
    """Called in each worker after gunicorn forks (preload is off), so the tracer's
    threads and connections belong to the process that uses them."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format, buffered=True)
    telemetry.enable_metrics(settings.metrics_enabled)
    provider = telemetry.setup_tracing()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await run_in_threadpool(Services.start, settings, embedder)
        app.state.services = services
        await run_in_threadpool(services.prepare_store)
        if settings.metrics_enabled:
            metrics.BUILD_INFO.labels(
                __version__,
                platform.python_version(),
                services.embedder.model_id,
                services.generator.id,
            ).set(1)
            metrics.schedule()
        # Everything built so far (model, clients, imported modules) lives as long as the
        # worker: moved out of the collector's reach, a full collection walks only what
        # requests allocate instead of pausing tens of milliseconds (docs/BENCHMARKS.md).
        gc.freeze()
        log.info(
            "ready to serve",
            store=services.store.location,
            cache="redis" if services.cache else "off",
            model=services.embedder.model_id,
            generator=services.generator.id,
            tracing="off"
            if provider is None
            else "exporting"
            if telemetry.traces.exporting()
            else "ids only",
        )
        flusher.start()
        try:
            yield
        finally:
            try:
                await services.aclose()
            finally:
                flusher.flush()  # logs and counters first: local, and quick
                telemetry.shutdown_tracing()  # bounded by the span processor's deadline
                flusher.flush()

    # The server span comes from RequestTelemetry; FastAPI's own telemetry stays off.
    app = FastAPI(
        title="RAG API",
        version=__version__,
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    # Routes are tried in order: the hot path first (~20 µs less per cached answer).
    app.include_router(query.router)
    app.include_router(health.router)
    app.include_router(documents.router)
    app.include_router(metrics_router.router)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error, status, kind in _ERRORS:
        app.add_exception_handler(error, _error(status, kind))
    # Exceptions no handler here answers are answered by RequestTelemetry, inside the
    # request's trace and with its id; this one only catches what escapes it.
    app.add_exception_handler(Exception, _last_resort)
    # Added last runs first: telemetry wraps the body limit, so a 413 is counted and logged.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        RequestTelemetry,
        access_log_on=settings.access_log,
        tracing_on=provider is not None,
    )
    return app

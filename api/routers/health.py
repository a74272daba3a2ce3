from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from api import __version__
from api.deps import ServicesDep
from api.schemas import DependencyState, Health, Readiness
from api.store import EmbeddingModelMismatch, StoreUnavailable, probe

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Liveness: answers as long as the process serves requests; touches no dependency."""
    return Health(status="ok", version=__version__)


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "the vector store is unusable"}},
)
async def ready(services: ServicesDep, response: Response) -> Readiness:
    """Readiness: the vector store, the embedding model and the LLM (unless there is a
    fallback) are required; Redis only speeds things up, so a Redis outage degrades the
    replica without taking it out of rotation."""
    deps: dict[str, DependencyState] = {
        "model": DependencyState(status="ok", detail=services.embedder.model_id),
    }
    try:
        await probe(services.store.heartbeat)
        deps["chroma"] = DependencyState(status="ok", detail=services.store.location)
    except (StoreUnavailable, EmbeddingModelMismatch) as exc:
        deps["chroma"] = DependencyState(status="down", detail=str(exc))
    if services.cache is None:
        deps["redis"] = DependencyState(status="disabled", detail="REDIS_URL is not set")
    elif services.cache.available and await run_in_threadpool(services.cache.ping):
        deps["redis"] = DependencyState(status="ok")
    else:
        deps["redis"] = DependencyState(
            status="degraded", detail="unreachable; answering without cache"
        )
    if services.settings.generator == "extractive":
        deps["llm"] = DependencyState(status="disabled", detail="GENERATOR=extractive")
    elif (why := await services.generator.check()) is None:
        deps["llm"] = DependencyState(status="ok", detail=services.settings.llm_model)
    elif services.settings.llm_fallback == "extractive":
        deps["llm"] = DependencyState(status="degraded", detail=f"{why}; answering extractively")
    else:
        deps["llm"] = DependencyState(status="down", detail=why)
    if "down" in {deps["chroma"].status, deps["llm"].status}:
        response.status_code = 503
        return Readiness(status="unavailable", dependencies=deps)
    degraded = any(d.status == "degraded" for d in deps.values())
    return Readiness(status="degraded" if degraded else "ready", dependencies=deps)

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from api.deps import ServicesDep
from api.store import StoreUnavailable, VectorStore
from api.telemetry import metrics

router = APIRouter(tags=["metrics"])


class StoreSize:
    """Documents and chunks in the store, read at scrape time: the same for every worker."""

    def __init__(self, store: VectorStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        try:
            documents, chunks = self._store.count_documents(), self._store.count_chunks()
        except StoreUnavailable:
            return
        yield GaugeMetricFamily(
            "rag_store_documents", "Documents in the vector store.", value=documents
        )
        yield GaugeMetricFamily("rag_store_chunks", "Chunks in the vector store.", value=chunks)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request, services: ServicesDep) -> Response:
    """Prometheus exposition of every worker of this replica; OpenMetrics (with exemplars
    linking to traces) when the scraper accepts it. Not published through nginx."""
    body, content_type = await run_in_threadpool(
        metrics.exposition, request.headers.get("accept", ""), [StoreSize(services.store)]
    )
    return Response(body, media_type=content_type)

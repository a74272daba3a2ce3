from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from api.deps import ServicesDep
from api.store import StoreUnavailable, VectorStore, probe
from api.telemetry import metrics

router = APIRouter(tags=["metrics"])


class StoreSize:
    """Documents and chunks in the store, read at scrape time: the same for every worker."""

    def __init__(self, documents: int, chunks: int) -> None:
        self._documents = documents
        self._chunks = chunks

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "rag_store_documents", "Documents in the vector store.", value=self._documents
        )
        yield GaugeMetricFamily(
            "rag_store_chunks", "Chunks in the vector store.", value=self._chunks
        )


def _store_size(store: VectorStore) -> StoreSize:
    return StoreSize(store.count_documents(), store.count_chunks())


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request, services: ServicesDep) -> Response:
    """Prometheus exposition of every worker of this replica; OpenMetrics (with exemplars
    linking to traces) when the scraper accepts it. Not published through nginx. A store
    that is down or slow to answer leaves out its two gauges, not the replica's metrics."""
    extra = []
    with contextlib.suppress(StoreUnavailable):
        extra.append(await probe(partial(_store_size, services.store)))
    body, content_type = await run_in_threadpool(
        metrics.exposition, request.headers.get("accept", ""), extra
    )
    return Response(body, media_type=content_type)

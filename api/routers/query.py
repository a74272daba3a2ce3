from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.answer import Event
from api.deps import ServicesDep
from api.schemas import QueryRequest, QueryResponse, Source
from api.store import Hit

router = APIRouter(tags=["query"])

_STREAM_DOC = {
    "200": {
        "content": {
            "text/event-stream": {
                "description": "With stream=true or Accept: text/event-stream: events `sources` "
                "(once, first), `token` (one per text delta), then `done` (processing_time, "
                "cached, generator, usage) or `error` (detail) after which the stream ends."
            }
        }
    },
    "503": {"description": "the vector store or the LLM is unavailable"},
}


async def _sse(events: AsyncIterator[Event]) -> AsyncIterator[ServerSentEvent]:
    async for event in events:
        data = event.data
        if event.name == "sources":  # the same shape as `sources` in a JSON answer
            data = {"sources": [_source(h).model_dump() for h in data["sources"]]}
        yield ServerSentEvent(data=json.dumps(data), event=event.name)


def _source(hit: Hit) -> Source:
    return Source(
        document=hit.source,
        content=hit.content,
        score=hit.score,
        document_id=hit.doc_id,
        title=hit.title,
        chunk=hit.chunk,
    )


@router.post("/query", response_model=QueryResponse, responses=_STREAM_DOC)  # type: ignore[arg-type]
async def query(body: QueryRequest, request: Request, services: ServicesDep) -> Any:
    question = body.question.strip()
    limit = services.settings.max_question_chars
    if not question:
        raise HTTPException(422, "question must not be blank")
    if len(question) > limit:
        raise HTTPException(422, f"question is longer than {limit} characters")
    queries = services.queries
    if body.stream or "text/event-stream" in request.headers.get("accept", ""):
        events = await queries.events(question, body.max_sources, body.temperature)
        # sse-starlette watches for the client leaving and cancels the stream at once,
        # which closes the upstream LLM request instead of letting it run to the end.
        return EventSourceResponse(
            _sse(events),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            ping=15,
        )
    result = await queries.answer(question, body.max_sources, body.temperature)
    return QueryResponse(
        answer=result.answer,
        sources=[_source(h) for h in result.sources],
        processing_time=round(result.processing_time, 6),
        cached=result.cached,
        generator=result.generator,
        usage=asdict(result.usage) if result.usage is not None else None,
    )

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool

from api.deps import ServicesDep
from api.schemas import QueryRequest, QueryResponse, Source

router = APIRouter(tags=["query"])


@router.post("/query", response_model=QueryResponse)
async def query(body: QueryRequest, services: ServicesDep) -> QueryResponse:
    question = body.question.strip()
    limit = services.settings.max_question_chars
    if not question:
        raise HTTPException(422, "question must not be blank")
    if len(question) > limit:
        raise HTTPException(422, f"question is longer than {limit} characters")
    if body.stream:
        raise HTTPException(501, "streaming answers are not available yet; send stream=false")
    result = await run_in_threadpool(
        services.queries.answer, question, body.max_sources, body.temperature
    )
    return QueryResponse(
        answer=result.answer,
        sources=[
            Source(
                document=h.source,
                content=h.content,
                score=h.score,
                document_id=h.doc_id,
                title=h.title,
                chunk=h.chunk,
            )
            for h in result.sources
        ],
        processing_time=round(result.processing_time, 6),
        cached=result.cached,
    )

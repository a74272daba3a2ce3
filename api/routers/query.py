from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.routing import APIRoute
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.answer import Event
from api.deps import json_body, services_of
from api.schemas import INVALID_BODY, QueryRequest, QueryResponse


class _RequestOnly(APIRoute):
    """The endpoint takes the Request alone and is called with it as it is. FastAPI's
    dependency solving, with nothing to solve, cost ~6% of a cached answer. OpenAPI still
    comes from the route's declaration. Dependencies given to the router or the app when
    it is included are not run for these routes: main.py gives none."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # A parameter for FastAPI to fill would be silently missing: refuse it instead.
        if list(inspect.signature(self.endpoint).parameters) != ["request"]:
            raise TypeError(f"{self.path}: a request-only route takes `request` alone")
        return self.endpoint


router = APIRouter(tags=["query"], route_class=_RequestOnly)

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
    **INVALID_BODY,
}


_QUERY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": QueryRequest.model_json_schema()}},
    }
}


async def _sse(events: AsyncIterator[Event]) -> AsyncIterator[ServerSentEvent]:
    async for event in events:
        yield ServerSentEvent(data=json.dumps(event.data), event=event.name)


# The body is validated from its bytes and the answer returned as rendered JSON (see
# json_body and QueryService.answer_json); the models still describe both in OpenAPI.
@router.post(
    "/query",
    response_model=QueryResponse,
    responses=_STREAM_DOC,  # type: ignore[arg-type]
    openapi_extra=_QUERY_BODY,
)
async def query(request: Request) -> Response:
    services = services_of(request)  # not a Depends: see _RequestOnly
    body = await json_body(request, QueryRequest)
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
    answer = await queries.answer_json(question, body.max_sources, body.temperature)
    return Response(answer, media_type="application/json")

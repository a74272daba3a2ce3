"""FastAPI dependencies: handlers receive what they need, never reach for globals."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from api.services import Services

Body = TypeVar("Body", bound=BaseModel)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    # async: a plain `def` dependency would be run on the thread pool, a thread hop per
    # request for an attribute read.
    return services_of(request)


ServicesDep = Annotated[Services, Depends(get_services)]


async def json_body(request: Request, model: type[Body]) -> Body:
    """A JSON body validated by pydantic straight from its bytes. FastAPI's body
    parameters parse with json.loads first and then validate the objects: ~30 µs more on
    a ~300 µs cached answer. Errors become the usual 422, located under "body" as
    FastAPI's own are."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from exc

"""FastAPI dependencies: handlers receive what they need, never reach for globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.services import Services


async def get_services(request: Request) -> Services:
    # async: a plain `def` dependency would be run on the thread pool, a thread hop per
    # request for an attribute read.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

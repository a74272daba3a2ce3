"""FastAPI dependencies: handlers receive what they need, never reach for globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.config import Settings
from api.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_settings(request: Request) -> Settings:
    return get_services(request).settings


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

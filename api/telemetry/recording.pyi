# The interface of recording.pyx (compiled), for type checkers.
from typing import Any

from opentelemetry.trace import SpanContext
from starlette.types import Message, Scope, Send

UNTRACED: frozenset[str]

def access(fields: dict[str, Any], request_id: str, context: SpanContext | None) -> None: ...

class Recorder:
    access_log_on: bool
    tracing_on: bool
    def __init__(self, access_log_on: bool = True, tracing_on: bool = True) -> None: ...
    def begin(self, scope: Scope, send: Send) -> Request: ...

class Request:
    request_id: str
    status: int
    started: bool
    async def __call__(self, message: Message) -> None: ...
    def failed(self, exc: BaseException) -> None: ...
    def finish(self, scope: Scope) -> None: ...

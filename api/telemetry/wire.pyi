# The interface of wire.pyx (compiled), for type checkers.
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import SpanLimits

class SpanRows:
    dropped: int
    stopped: bool
    resource: bytes | None
    def __init__(
        self,
        max_queue: int,
        batch: int,
        wake: Any,
        encode_row: Callable[[Any], bytes],
        encode_resource: Callable[[Any], bytes],
        encode_scope: Callable[[tuple[Any, ...]], bytes],
        limits: SpanLimits,
    ) -> None: ...
    def put(self, span: Any) -> None: ...
    def take(self) -> tuple[list[bytes], int]: ...

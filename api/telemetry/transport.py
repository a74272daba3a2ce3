"""The span relay's HTTP transport to a plain-HTTP collector: one kept-alive `http.client`
connection, under the OTLP exporter's own client. The client keeps everything the
OTEL_EXPORTER_OTLP_* settings ask for: endpoint, headers, compression, timeout, retries with
backoff and Retry-After.

Why not the exporter's `requests` session? A saturated replica's relay posts many times a
second, on the core that feeds the workers. On a 100 KB post `requests` spent ~630 µs of
CPU, against ~120 µs here (docs/BENCHMARKS.md, session 17). Much of the gap is `requests`
reading the proxy settings from the environment again for every post.

`requests` does more than this transport does in some cases: TLS with its own CA bundle, a
proxy, a .netrc login, credentials in the URL, or a credential provider's session. In all of
these `lean_transport` returns None, and the exporter keeps its own transport."""

from __future__ import annotations

import http.client
import os
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import cast
from urllib.parse import urlsplit

import requests.utils
from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.sdk.environment_variables import (
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER,
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER,
)

_CREDENTIAL_PROVIDERS = (
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER,
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER,
)


def lean_transport(endpoint: str) -> KeptAliveTransport | None:
    """This transport, where its post is the one `requests` would make; otherwise None."""
    url = urlsplit(endpoint)
    if url.scheme != "http" or url.username is not None or url.password is not None:
        return None
    if any(os.environ.get(name) for name in _CREDENTIAL_PROVIDERS):
        return None
    # The decision `requests` would make (it also honours NO_PROXY). The relay's environment
    # is fixed, so making it once here gives the same answer as making it on every post.
    if requests.utils.get_environ_proxies(endpoint) or requests.utils.get_netrc_auth(endpoint):
        return None
    return KeptAliveTransport()


@dataclass(frozen=True, slots=True)
class _Reply(BaseHTTPResult):
    body: bytes = b""
    fields: Message | None = None

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        # An http.client header block: looked up case-insensitively, as the base asks.
        return cast(Mapping[str, str], self.fields if self.fields is not None else {})


class KeptAliveTransport(BaseHTTPTransport):
    """One connection, reused for every post and opened again after any failure. The relay
    posts from one thread only."""

    def __init__(self) -> None:
        self._url = ""
        self._host = ""
        self._target = ""  # the endpoint's path and query
        self._connection: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        try:
            connection = self._connect(url, timeout)
            connection.request(method, self._target, body=data, headers=headers or {})
            response = connection.getresponse()
            body = response.read()  # all of it, or the connection cannot carry the next post
        except Exception as error:
            # A half-read response leaves the connection unusable: the next post opens a
            # new one. The client retries a connection error at once, as with `requests`.
            self.close()
            return _Reply(error=error)
        return _Reply(
            status_code=response.status, reason=response.reason, body=body, fields=response.msg
        )

    def _connect(self, url: str, timeout: float | None) -> http.client.HTTPConnection:
        if url != self._url:
            self.close()
            self._url = url
            parts = urlsplit(url)
            self._host = parts.netloc
            self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self._host, timeout=timeout)
        else:
            self._connection.timeout = timeout
            if self._connection.sock is not None:
                self._connection.sock.settimeout(timeout)
        return self._connection

    def is_connection_error(self, exception: Exception | None) -> bool:
        # What `requests` counts as one: a refused, reset or timed-out connection, or a
        # reply that is not HTTP.
        return isinstance(exception, (OSError, http.client.HTTPException))

    def close(self) -> None:
        # Also called by the exporter's shutdown, from another thread, while a post may
        # still be failing on this one: take the connection once.
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

"""The span relay's HTTP transport to a plain-HTTP collector: one kept-alive `http.client`
connection, under the OTLP exporter's own client. The client keeps everything the
OTEL_EXPORTER_OTLP_* settings ask for: endpoint, headers, compression, timeout, retries with
backoff and Retry-After.

Why not the exporter's `requests` session? A saturated replica's relay posts many times a
second, on the core that feeds the workers. On a 100 KB post `requests` spent 650 to 830 µs
of CPU, against 175 to 195 µs here (docs/BENCHMARKS.md, session 17). Part of the gap is
`requests` reading the proxy settings from the environment again for every post.

`requests` does more than this transport does in some cases: TLS with its own CA bundle, a
proxy, a .netrc login, credentials in the URL, a credential provider's session, a URL it
would escape or reject. In all of these `lean_transport` returns None, and the exporter
keeps its own transport."""

from __future__ import annotations

import contextlib
import http.client
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests.utils
from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.sdk.environment_variables import (
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER,
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER,
)
from urllib3 import HTTPHeaderDict

_CREDENTIAL_PROVIDERS = (
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER,
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER,
)


def lean_transport(endpoint: str) -> KeptAliveTransport | None:
    """This transport, where its post is the one `requests` would make; otherwise None."""
    url = urlsplit(endpoint)
    try:
        url.port  # noqa: B018  # raises for a port that is not a number
    except ValueError:
        return None  # requests says what is wrong with it
    if url.scheme != "http" or url.username is not None or url.password is not None:
        return None
    if requests.utils.requote_uri(endpoint) != endpoint:  # requests would escape the path
        return None
    if any(os.environ.get(name) for name in _CREDENTIAL_PROVIDERS):
        return None
    # The proxy `requests` would pick (NO_PROXY included), and its .netrc login. The relay's
    # environment is fixed, so asking once here gives the answer of every post.
    proxies = requests.utils.get_environ_proxies(endpoint)
    if requests.utils.select_proxy(endpoint, proxies) or requests.utils.get_netrc_auth(endpoint):
        return None
    return KeptAliveTransport()


@dataclass(frozen=True, slots=True)
class _Reply(BaseHTTPResult):
    body: bytes = b""
    fields: list[tuple[str, str]] | None = None

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        # Made only when asked (the client asks on a retry): case-insensitive, a repeated
        # header joined with commas, as the base asks.
        return HTTPHeaderDict(self.fields or [])


class KeptAliveTransport(BaseHTTPTransport):
    """One connection, reused for every post and opened again after any failure. Posts
    come from one thread; `close` may also come from the exporter's shutdown, on another."""

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
            # A collector may answer before it has read the body (a 413, a 401) and close:
            # read that answer, as urllib3 does, rather than retry the post until the
            # timeout.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.request(method, self._target, body=data, headers=headers or {})
            response = connection.getresponse()
            body = response.read()  # all of it, or the connection cannot carry the next post
        except Exception as error:
            # A half-read response leaves the connection unusable: the next post opens a
            # new one.
            self.close()
            return _Reply(error=error)
        return _Reply(
            status_code=response.status,
            reason=response.reason,
            body=body,
            fields=response.getheaders(),
        )

    def _connect(self, url: str, timeout: float | None) -> http.client.HTTPConnection:
        if url != self._url:
            self.close()
            self._url = url
            parts = urlsplit(url)
            self._host = parts.netloc
            self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection = self._connection  # read once: `close` may run on another thread
        if connection is None:
            connection = self._connection = http.client.HTTPConnection(self._host, timeout=timeout)
        else:
            connection.timeout = timeout
            if (sock := connection.sock) is not None:
                sock.settimeout(timeout)
        return connection

    def is_connection_error(self, exception: Exception | None) -> bool:
        # As `requests` classes them: a refused, reset or timed-out connection, or a reply
        # that is not HTTP, is retried at once and then with backoff; a malformed URL or a
        # reply body cut short is not.
        return isinstance(exception, (OSError, http.client.HTTPException)) and not isinstance(
            exception, (http.client.InvalidURL, http.client.IncompleteRead)
        )

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

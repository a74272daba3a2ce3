"""Answers from any OpenAI-compatible `/v1/chat/completions` server (llama.cpp, vLLM,
Ollama, OpenAI), streamed token by token."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import structlog
from httpx_sse import EventSource

from api.config import Settings
from api.generation import Completion, GeneratorUnavailable, Usage
from api.prompt import TokenCounter, build_prompt
from api.store import Hit

log = structlog.get_logger(__name__)


class OpenAIGenerator:
    name = "openai"

    def __init__(self, settings: Settings, count_tokens: TokenCounter) -> None:
        self.id = f"openai:{settings.llm_model}:{settings.llm_max_tokens}"
        self._base_url = (settings.llm_base_url or "").rstrip("/")
        # What messages (503 details, /ready) name: the URL without any user:password in it.
        self._shown = (
            str(httpx.URL(self._base_url).copy_with(userinfo=b"")) if self._base_url else ""
        )
        self._model = settings.llm_model
        self._max_tokens = settings.llm_max_tokens
        self._context = settings.llm_context_tokens
        self._count = count_tokens
        headers = (
            {"Authorization": f"Bearer {settings.llm_api_key}"} if settings.llm_api_key else {}
        )
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers=headers,
            # httpx retries connection failures only, never a request the server received.
            transport=httpx.AsyncHTTPTransport(
                retries=settings.llm_retries,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            ),
            timeout=httpx.Timeout(
                settings.llm_timeout_seconds, connect=settings.llm_connect_timeout_seconds
            ),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def check(self) -> str | None:
        if not self._base_url:
            return "LLM_BASE_URL is not set"
        try:
            response = await self._client.get("/models", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"{self._shown} unreachable: {exc!r}"
        if response.status_code >= 400:
            return f"{self._shown}/models answered {response.status_code}"
        return None

    async def start(self, question: str, sources: Sequence[Hit], temperature: float) -> Completion:
        if not self._base_url:
            raise GeneratorUnavailable("LLM_BASE_URL is not set")
        prompt = build_prompt(question, sources, self._context, self._max_tokens, self._count)
        body = {
            "model": self._model,
            "messages": prompt.messages,
            "temperature": temperature,
            "max_tokens": self._max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        request = self._client.build_request("POST", "/chat/completions", json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise GeneratorUnavailable(f"LLM server {self._shown} failed: {exc!r}") from exc
        if response.status_code >= 400:
            # What the server said goes to the log, not to the client: it may name internals.
            detail = (await response.aread())[:300].decode(errors="replace")
            await response.aclose()
            log.warning("llm server refused", status=response.status_code, detail=detail)
            raise GeneratorUnavailable(f"LLM server {self._shown} answered {response.status_code}")
        usage = Usage(prompt_tokens=prompt.tokens)
        return Completion(
            self._deltas(response, usage), prompt.sources, self.name, usage, response.aclose
        )

    async def _deltas(self, response: httpx.Response, usage: Usage) -> AsyncIterator[str]:
        produced = 0
        finished = False
        try:
            async for event in EventSource(response).aiter_sse():
                if event.data == "[DONE]":
                    finished = True
                    break
                chunk: dict[str, Any] = json.loads(event.data)
                if "error" in chunk:
                    # How OpenAI-compatible servers (vLLM, OpenAI) report a failure after
                    # the answer began; the answer so far is cut short, not complete.
                    log.warning("llm server failed mid-answer", detail=str(chunk["error"])[:300])
                    raise GeneratorUnavailable(f"LLM server {self._shown} failed mid-answer")
                if reported := chunk.get("usage"):
                    usage.prompt_tokens = int(reported.get("prompt_tokens", usage.prompt_tokens))
                    usage.completion_tokens = int(reported.get("completion_tokens", produced))
                for choice in chunk.get("choices") or []:
                    finished = finished or bool(choice.get("finish_reason"))
                    if text := (choice.get("delta") or {}).get("content"):
                        if not isinstance(text, str):
                            raise TypeError(f"content is {type(text).__name__}, not text")
                        produced += 1
                        usage.completion_tokens = max(usage.completion_tokens, produced)
                        yield _whole_characters(text)
        except httpx.HTTPError as exc:
            raise GeneratorUnavailable(f"LLM stream from {self._shown} broke: {exc!r}") from exc
        # Valid JSON in the wrong shape (a list, a string, a number where an object or text
        # belongs, a count past any integer) is as malformed as invalid JSON: the server is
        # at fault, not this one.
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise GeneratorUnavailable(f"LLM server sent a malformed event: {exc}") from exc
        finally:
            await response.aclose()
        if not finished:  # neither [DONE] nor a finish reason: the answer was cut short
            raise GeneratorUnavailable(f"LLM stream from {self._shown} ended mid-answer")


_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, only ever a half of a pair


def _whole_characters(text: str) -> str:
    """A server that splits a surrogate pair between two events (JSON escapes each half)
    would hand on halves no response or cache record can hold: they become U+FFFD."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)

"""`make bench`, part two: time to first token and tokens/s through the API vs straight
from the LLM server, side by side in one run.

Each round asks the API a question (streamed), rebuilds the very prompt the API sent from
the sources it reported, and sends that prompt to the LLM server directly. llama.cpp
reuses the KV cache of the previous prompt, so an unrelated prompt runs before each of
the two and both are measured from a cold cache.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from api.prompt import build_prompt, gguf_token_counter
from api.store import Hit
from tests.servers import ApiServer, LlamaServer

QUESTIONS = [
    "How do I restore a backup?",
    "What happens when Redis is down?",
    "Why does nginx use least_conn?",
    "How do I find the memory limit of a replica?",
    "Which alerts page the on-call engineer?",
    "How are documents chunked before embedding?",
    "How do I roll back a bad deploy?",
    "Why is /metrics not published through nginx?",
]
MAX_TOKENS = 64
CONTEXT = 2048


def _timed(
    lines: Iterator[str], is_token: Callable[[str], bool]
) -> tuple[float | None, float, int]:
    """(first token at, last token at, tokens) in perf_counter seconds."""
    first = None
    last = 0.0
    tokens = 0
    for line in lines:
        if is_token(line):
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
    return first, last, tokens


def _via_api(base: str, question: str) -> tuple[dict[str, float], list[Hit]]:
    body = {"question": question, "temperature": 0.0, "stream": True}
    sources: list[Hit] = []
    start = time.perf_counter()
    with httpx.stream("POST", f"{base}/query", json=body, timeout=120) as response:
        lines = iter(response.iter_lines())
        pending = None
        for line in lines:
            if pending == "sources" and line.startswith("data: "):
                sources_at = time.perf_counter() - start
                sources = [
                    Hit(
                        doc_id=s["document_id"],
                        source=s["document"],
                        title=s["title"],
                        chunk=s["chunk"],
                        content=s["content"],
                        score=s["score"],
                    )
                    for s in json.loads(line[6:])["sources"]
                ]
                break
            pending = line[7:] if line.startswith("event: ") else pending
        first, last, tokens = _timed(lines, lambda ln: ln == "event: token")
    assert first is not None, "the API streamed no tokens"
    return {
        "ttft": first - start,
        "tps": (tokens - 1) / max(last - first, 1e-9),
        "ready": sources_at,
    }, sources


def _direct(llm: str, messages: list[dict[str, str]]) -> dict[str, float]:
    body = {
        "model": "bench",
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }

    def is_token(line: str) -> bool:
        if not line.startswith("data: {"):
            return False
        choices = json.loads(line[6:]).get("choices") or [{}]
        return bool((choices[0].get("delta") or {}).get("content"))

    start = time.perf_counter()
    with httpx.stream("POST", f"{llm}/chat/completions", json=body, timeout=120) as response:
        headers_at = time.perf_counter() - start
        first, last, tokens = _timed(response.iter_lines(), is_token)
    assert first is not None, "the LLM streamed no tokens"
    return {
        "ttft": first - start,
        "tps": (tokens - 1) / max(last - first, 1e-9),
        "ready": headers_at,
    }


def _flush(llm: str) -> None:
    httpx.post(
        f"{llm}/completions", json={"prompt": "Unrelated.", "max_tokens": 1}, timeout=60
    ).raise_for_status()


def measure(rounds: int = 16) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        llm_server = LlamaServer(Path(tmp) / "llama")
        llm_server.start()
        count = gguf_token_counter(llm_server.model)
        api = ApiServer(
            Path(tmp),
            LLM_BASE_URL=llm_server.base_url,
            LLM_GGUF=str(llm_server.model),
            LLM_MAX_TOKENS=str(MAX_TOKENS),
            LLM_CONTEXT_TOKENS=str(CONTEXT),
            LOG_LEVEL="warning",
        )
        base = api.base
        try:
            api.start()
            _via_api(base, "warm-up question")
            api_runs: list[dict[str, float]] = []
            direct_runs: list[dict[str, float]] = []
            for i in range(rounds):
                question = QUESTIONS[i % len(QUESTIONS)] + f" (round {i})"  # no cache hits
                _flush(llm_server.base_url)
                via_api, sources = _via_api(base, question)
                api_runs.append(via_api)
                prompt = build_prompt(question, sources, CONTEXT, MAX_TOKENS, count)
                _flush(llm_server.base_url)
                direct_runs.append(_direct(llm_server.base_url, prompt.messages))
        finally:
            api.stop()
            llm_server.stop()

    # Prefill (~2.7 s) varies by +-100 ms from one request to the next, which drowns a
    # difference of a few ms in time to first token. The API's part is measured where no
    # prefill is involved: it sends `sources` once it has retrieved, built the prompt and
    # got the LLM's response headers, which llama.cpp sends before prefill. So the API's
    # share = time to `sources` through the API - time to headers straight from the LLM.
    added = [(a["ready"] - d["ready"]) * 1000 for a, d in zip(api_runs, direct_runs, strict=True)]
    quartiles = statistics.quantiles(added, n=4)
    ttft_diff = [(a["ttft"] - d["ttft"]) * 1000 for a, d in zip(api_runs, direct_runs, strict=True)]

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "rounds": rounds,
        "api_ttft_ms": median(api_runs, "ttft") * 1000,
        "direct_ttft_ms": median(direct_runs, "ttft") * 1000,
        "added_ttft_ms": statistics.median(added),
        "end_to_end_ttft_difference_ms": statistics.median(ttft_diff),
        "end_to_end_ttft_difference_q1_ms": statistics.quantiles(ttft_diff, n=4)[0],
        "end_to_end_ttft_difference_q3_ms": statistics.quantiles(ttft_diff, n=4)[2],
        "added_ttft_ms_q1": quartiles[0],
        "added_ttft_ms_q3": quartiles[2],
        "api_tokens_per_s": median(api_runs, "tps"),
        "direct_tokens_per_s": median(direct_runs, "tps"),
    }


def report(result: dict[str, float]) -> None:
    print(
        f"\nstreaming, SmolLM2-135M on llama.cpp ({os.cpu_count()} cores), "
        f"{result['rounds']:.0f} rounds, medians:"
    )
    print(f"{'':26}{'through API':>14}{'direct':>10}")
    print(
        f"{'time to first token, ms':26}{result['api_ttft_ms']:14.1f}"
        f"{result['direct_ttft_ms']:10.1f}"
    )
    print(f"{'tokens/s':26}{result['api_tokens_per_s']:14.1f}{result['direct_tokens_per_s']:10.1f}")
    low, high = (
        result["end_to_end_ttft_difference_q1_ms"],
        result["end_to_end_ttft_difference_q3_ms"],
    )
    print(
        f"(end-to-end TTFT difference: median {result['end_to_end_ttft_difference_ms']:.1f}"
        f" ms, interquartile {low:.0f} to {high:.0f} ms: prefill noise)"
    )
    print(
        f"target: the API adds <= 20 ms to time to first token: "
        f"{result['added_ttft_ms']:.1f} ms (median per round; interquartile "
        f"{result['added_ttft_ms_q1']:.1f} to {result['added_ttft_ms_q3']:.1f} ms)"
    )

"""Answer generation behind one streaming interface.

`Generator.start` opens a `Completion` (or raises `GeneratorUnavailable` before anything
was produced); iterating it yields the answer's text deltas as they come. The extractive
generator needs no model: it quotes the source sentences that share the most words with
the question and cites each one as [n], the 1-based position of its source. The
OpenAI-compatible generator lives in api/llm.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from api.store import Hit

NO_ANSWER = "I could not find anything about that in the indexed documents."

# A sentence ends at . ! or ? followed by white space (so `backup.sh` and 0.25 stay whole),
# or at a line break (list items and headings).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n+")
_WORD = re.compile(r"[a-z0-9][a-z0-9_.-]*[a-z0-9]|[a-z0-9]")
# Markdown that reads badly in a quoted sentence: leading list/heading/quote marks, code
# ticks, and emphasis marks at word edges (so REDIS_URL and snake_case stay whole).
_MARKUP = re.compile(r"^[\s#>*+|-]+|`+|\*+(?=\w)|(?<=\w)\*+|(?<!\w)_+(?=\w)|(?<=\w)_+(?!\w)")
_STOPWORDS = frozenset(
    """a an and are as at be but by can do does for from has have how i if in into is it its
    me my no not of on or our should so than that the their then there these they this to up
    was we what when where which who why will with would you your""".split()
)


class GeneratorUnavailable(RuntimeError):
    """The generator cannot answer now (server down, timeout, refused request)."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def _nothing() -> None:
    return None


@dataclass
class Completion:
    """An answer being generated. Iterate `deltas` for the text; `usage` is complete once
    they are exhausted; `close` releases the upstream request (and cancels it if unfinished)."""

    deltas: AsyncIterator[str]
    sources: list[Hit]
    generator: str
    usage: Usage | None = None
    close: Callable[[], Awaitable[None]] = field(default=_nothing)


class Generator(Protocol):
    name: str
    # Identifies everything that shapes an answer (model, limits): part of cache keys.
    id: str

    async def start(
        self, question: str, sources: Sequence[Hit], temperature: float
    ) -> Completion: ...

    async def check(self) -> str | None:
        """None when usable, else why not (for /ready)."""
        ...

    async def aclose(self) -> None: ...


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


class ExtractiveGenerator:
    name = "extractive"

    def __init__(self, max_sentences: int = 3) -> None:
        self._max = max_sentences
        self.id = f"extractive-v1:{max_sentences}"

    async def start(self, question: str, sources: Sequence[Hit], temperature: float) -> Completion:
        # Deterministic: temperature has nothing to sample here.
        pieces = self.sentences(question, sources)

        async def deltas() -> AsyncIterator[str]:
            for piece in pieces:
                yield piece

        return Completion(deltas(), list(sources), self.name)

    async def check(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None

    def sentences(self, question: str, sources: Sequence[Hit]) -> list[str]:
        """The answer as pieces: the best-matching sentences, each with its citation."""
        wanted = _terms(question)
        candidates: list[tuple[float, int, int, str]] = []
        seen: set[str] = set()
        for n, hit in enumerate(sources, start=1):
            for pos, raw in enumerate(_SENTENCE_END.split(hit.content)):
                sentence = _MARKUP.sub("", raw).strip()
                words = _terms(sentence)
                if len(words) < 3 or sentence.lower() in seen:
                    continue
                seen.add(sentence.lower())
                overlap = len(wanted & words)
                if overlap:
                    # Shared words, damped for long sentences; the retrieval score breaks ties.
                    score = overlap / math.sqrt(len(words)) + 0.1 * hit.score
                    candidates.append((score, n, pos, sentence))
        if not candidates:
            if not sources:
                return [NO_ANSWER]
            first = next((s for s in _SENTENCE_END.split(sources[0].content) if s.strip()), "")
            candidates = [(0.0, 1, 0, _MARKUP.sub("", first).strip())]
        best = sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))[: self._max]
        # Read in source order so the answer follows the documents' own flow.
        ordered = sorted(best, key=lambda c: (c[1], c[2]))
        return [
            ("" if i == 0 else " ") + f"{sentence} [{n}]"
            for i, (_, n, _, sentence) in enumerate(ordered)
        ]

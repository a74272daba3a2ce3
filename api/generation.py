"""Answer generation behind a streaming interface.

A generator yields the answer in pieces, so a language model can stream tokens over SSE
through the same seam. The extractive generator needs no model: it quotes the source
sentences that share the most words with the question and cites each one as [n], the
1-based position of its source in the response.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Protocol

from api.store import Hit

NO_ANSWER = "I could not find anything about that in the indexed documents."

# A sentence ends at . ! or ? followed by white space (so `backup.sh` and 0.25 stay whole),
# or at a line break (list items and headings).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n+")
_WORD = re.compile(r"[a-z0-9][a-z0-9_.-]*[a-z0-9]|[a-z0-9]")
_MARKUP = re.compile(r"^[\s#>*\-+`|]+|[`*_]+")
_STOPWORDS = frozenset(
    """a an and are as at be but by can do does for from has have how i if in into is it its
    me my no not of on or our should so than that the their then there these they this to up
    was we what when where which who why will with would you your""".split()
)


class Generator(Protocol):
    id: str

    def stream(self, question: str, sources: Sequence[Hit], temperature: float) -> Iterator[str]:
        """Yield the answer in order; joined, the pieces are the whole answer."""
        ...


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


class ExtractiveGenerator:
    id = "extractive-v1"

    def __init__(self, max_sentences: int = 3) -> None:
        self._max = max_sentences

    def stream(self, question: str, sources: Sequence[Hit], temperature: float) -> Iterator[str]:
        # Deterministic: temperature has nothing to sample here.
        del temperature
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
                yield NO_ANSWER
                return
            first = next((s for s in _SENTENCE_END.split(sources[0].content) if s.strip()), "")
            candidates = [(0.0, 1, 0, _MARKUP.sub("", first).strip())]
        best = sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))[: self._max]
        # Read in source order so the answer follows the documents' own flow.
        for i, (_, n, _, sentence) in enumerate(sorted(best, key=lambda c: (c[1], c[2]))):
            yield ("" if i == 0 else " ") + f"{sentence} [{n}]"


def build_generator(name: str, answer_sentences: int) -> Generator:
    if name == "extractive":
        return ExtractiveGenerator(answer_sentences)
    raise ValueError(f"unknown GENERATOR {name!r}")

"""Questions for the load: a few popular ones (cache hits once warm) and a bank of unique
ones built from the sample corpus's headings (every one a cache miss)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "documents"

POPULAR = [
    "How do I restore a backup?",
    "What happens when Redis is down?",
    "How does nginx balance requests across replicas?",
    "What should I check when latency goes up?",
    "How do I roll back a deployment?",
]

_TEMPLATES = [
    "What does the runbook say about {topic}?",
    "How should an on-call engineer handle {topic}?",
    "Summarise {topic} in two sentences.",
    "Which settings matter for {topic}?",
    "What can go wrong with {topic}, and what is the fix?",
]


def topics(corpus: Path = CORPUS) -> list[str]:
    """Section headings of the corpus, lower-cased: the things a user would ask about."""
    found = []
    for path in sorted(corpus.glob("*.md")):
        for line in path.read_text().splitlines():
            if match := re.match(r"^#{1,3}\s+(.+)$", line):
                found.append(match.group(1).strip().lower())
    return found or ["the service"]


def unique_questions(prefix: str, corpus: Path = CORPUS) -> Iterator[str]:
    """An endless stream of distinct questions; `prefix` keeps two runs (or two Locust
    worker processes) from asking the same ones, so none is answered from the cache."""
    pairs = list(itertools.product(_TEMPLATES, topics(corpus)))
    for n in itertools.count():
        template, topic = pairs[n % len(pairs)]
        yield f"{template.format(topic=topic)} (ref {prefix}-{n})"

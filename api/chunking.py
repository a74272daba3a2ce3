"""Token-bounded chunking with overlap.

Chunks are cut on sentence and line boundaries, measured in the embedding model's own
tokens so no chunk is ever truncated by the model's 256-token window. The BERT
pre-tokenizer splits on whitespace and punctuation, so the token count of joined
segments is the sum of their counts: the budget holds exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers import Tokenizer

# A segment ends after sentence punctuation followed by space, or at a line break.
_SEGMENT = re.compile(r"[^\n]*?(?:[.!?][\"')\]]*(?=\s)|\n|$)", re.S)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    tokens: int


def _segments(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[Span]:
    raw = [
        (m.start(), m.end()) for m in _SEGMENT.finditer(text) if text[m.start() : m.end()].strip()
    ]
    encodings = tokenizer.encode_batch([text[s:e] for s, e in raw], add_special_tokens=False)
    spans: list[Span] = []
    for (start, end), enc in zip(raw, encodings, strict=True):
        if len(enc.ids) <= max_tokens:
            spans.append(Span(start, end, len(enc.ids)))
            continue
        spans.extend(_cut_long(start, end, enc.offsets, enc.word_ids, max_tokens))
    return spans


def _cut_long(
    start: int, end: int, offsets: list[tuple[int, int]], words: list[int | None], max_tokens: int
) -> list[Span]:
    """A sentence longer than a whole chunk is cut between words: a cut inside a word
    would re-tokenize into more pieces than it was counted as."""
    spans: list[Span] = []
    i, n = 0, len(offsets)
    while i < n:
        cut = min(i + max_tokens, n)
        if cut < n:
            # Back to the start of the word the budget ends in, unless that word alone
            # is longer than the budget.
            k = cut
            while k > i + 1 and words[k] == words[k - 1]:
                k -= 1
            if words[k] != words[k - 1]:
                cut = k
        stop = end if cut >= n else start + offsets[cut][0]
        spans.append(Span(start + offsets[i][0], stop, cut - i))
        i = cut
    return spans


def chunk_text(text: str, tokenizer: Tokenizer, max_tokens: int, overlap_tokens: int) -> list[str]:
    """Split `text` into chunks of at most `max_tokens` tokens, each repeating up to
    `overlap_tokens` tokens of whole segments from the end of the previous chunk."""
    spans = _segments(text, tokenizer, max_tokens)
    chunks: list[str] = []
    i = 0
    while i < len(spans):
        j, used = i, 0
        while j < len(spans) and used + spans[j].tokens <= max_tokens:
            used += spans[j].tokens
            j += 1
        chunk = text[spans[i].start : spans[j - 1].end].strip()
        if chunk:
            chunks.append(chunk)
        if j == len(spans):
            break
        # Step back over trailing segments that fit in the overlap, but always move forward.
        back, carried = j, 0
        while back - 1 > i and carried + spans[back - 1].tokens <= overlap_tokens:
            back -= 1
            carried += spans[back].tokens
        i = back
    return chunks

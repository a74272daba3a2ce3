"""The chat prompt: numbered sources, an instruction to answer from them only and to cite,
all fitted into the model's context window."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from api.store import Hit

TokenCounter = Callable[[str], int]

SYSTEM = (
    "You answer questions using only the numbered sources you are given. "
    "After each statement, cite the source it came from by its number in square brackets, "
    "like [1]. If the sources do not contain the answer, say that you do not know."
)
# Chat templates wrap each message in role markers; this covers them for common templates.
TEMPLATE_TOKENS = 24
# A source cut shorter than this is noise rather than context.
MIN_SOURCE_TOKENS = 32


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    sources: list[Hit]
    tokens: int


class QuestionTooLong(ValueError):
    """The question alone leaves the model no room to answer: the client's to shorten."""


def estimate_tokens(text: str) -> int:
    """For servers whose tokenizer we do not have: BPE vocabularies average about four
    characters a token on English prose; three keeps a margin. Counted in UTF-8 bytes, so
    text in other scripts (a CJK character is 3 bytes and 1-2 tokens, an emoji 4 bytes
    and 1-3) is not undercounted three or four times, as counting characters would."""
    return len(text.encode("utf-8", "surrogatepass")) // 3 + 1


_silence: object = None  # ctypes callbacks must outlive their registration


def gguf_token_counter(path: Path) -> TokenCounter:
    """Exact counts from the served model's own vocabulary (vocab only: a few MB)."""
    import ctypes

    import llama_cpp

    # llama.cpp writes its notes straight to stderr (past `verbose=False`), which would
    # break one-JSON-object-per-line logs. Only the vocabulary is used here: silence it.
    global _silence
    _silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_silence, ctypes.c_void_p(0))
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False))


def _cut(text: str, budget: int, count: TokenCounter) -> str:
    """The longest prefix of `text`, ending at a word, within `budget` tokens."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if count(text[:mid]) <= budget:
            low = mid
        else:
            high = mid - 1
    prefix = text[:low]
    return prefix[: prefix.rfind(" ")] if " " in prefix and low < len(text) else prefix


def build_prompt(
    question: str, sources: Sequence[Hit], context_tokens: int, max_tokens: int, count: TokenCounter
) -> Prompt:
    """Sources go in by rank; the first that does not fit is cut to the space left, the
    rest are left out, so the [n] the model sees match the sources returned."""
    question_part = f"Question: {question}"
    system_tokens = count(SYSTEM)
    limit = context_tokens - max_tokens - TEMPLATE_TOKENS - system_tokens
    if (needed := count(_render([], question_part))) > limit:
        raise QuestionTooLong(
            f"question is too long for the model: {needed} tokens where {limit} leave room "
            f"for a {max_tokens}-token answer"
        )
    # Parts are counted one by one (fast); each join may cost a token more than its parts.
    budget = limit - count("Sources:\n\n\n\n" + question_part) - 1
    blocks: list[str] = []
    kept: list[Hit] = []
    for hit in sources:
        header = f"[{len(kept) + 1}] ({hit.source})\n"
        block = header + hit.content
        cost = count(block) + 2
        if cost > budget:
            room = budget - count(header) - 2
            if room < MIN_SOURCE_TOKENS:
                break
            block = header + _cut(hit.content, room, count)
            cost = budget
        blocks.append(block)
        kept.append(hit)
        budget -= cost
    user = _render(blocks, question_part)
    # One exact count of the whole; in the rare case the parts undercounted, shorten the
    # last source by the difference.
    while blocks and (over := count(user) - limit) > 0:
        header, _, text = blocks[-1].partition("\n")
        shorter = _cut(text, max(count(text) - over - 2, 0), count)
        if count(shorter) < MIN_SOURCE_TOKENS:
            blocks.pop()
            kept.pop()
        else:
            blocks[-1] = f"{header}\n{shorter}"
        user = _render(blocks, question_part)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return Prompt(
        messages=messages, sources=kept, tokens=system_tokens + count(user) + TEMPLATE_TOKENS
    )


def _render(blocks: list[str], question_part: str) -> str:
    if not blocks:
        return f"There are no sources for this question.\n\n{question_part}"
    return "Sources:\n\n" + "\n\n".join(blocks) + "\n\n" + question_part

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


def estimate_tokens(text: str) -> int:
    """For servers whose tokenizer we do not have: BPE vocabularies average about four
    characters a token on English prose; three keeps a margin."""
    return len(text) // 3 + 1


def gguf_token_counter(path: Path) -> TokenCounter:
    """Exact counts from the served model's own vocabulary (vocab only: a few MB)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
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
    used_tokens = count(SYSTEM) + count(question_part) + TEMPLATE_TOKENS
    budget = context_tokens - max_tokens - used_tokens
    blocks: list[str] = []
    kept: list[Hit] = []
    for hit in sources:
        header = f"[{len(kept) + 1}] ({hit.source})\n"
        cost = count(header + hit.content) + 2
        if cost <= budget:
            blocks.append(header + hit.content)
        else:
            room = budget - count(header) - 2
            if room < MIN_SOURCE_TOKENS:
                break
            blocks.append(header + _cut(hit.content, room, count))
            cost = budget
        kept.append(hit)
        budget -= cost
        used_tokens += cost
    user = (
        "Sources:\n\n" + "\n\n".join(blocks) + "\n\n" + question_part
        if blocks
        else f"There are no sources for this question.\n\n{question_part}"
    )
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return Prompt(messages=messages, sources=kept, tokens=used_tokens)

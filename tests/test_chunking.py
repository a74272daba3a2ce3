from __future__ import annotations

import itertools
import random
import re
import string

import pytest
from tokenizers import Tokenizer

from api.chunking import chunk_text
from api.embeddings import Embedder
from tests.conftest import CORPUS_DIR


@pytest.fixture(scope="module")
def tok(embedder: Embedder) -> Tokenizer:
    return embedder.counter


def ntokens(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("max_tokens,overlap", [(200, 40), (64, 16), (254, 0)])
def test_chunks_fit_the_budget_and_cover_every_sentence(tok, max_tokens, overlap):
    text = "\n\n".join(p.read_text() for p in sorted(CORPUS_DIR.glob("*.md")))
    chunks = chunk_text(text, tok, max_tokens, overlap)
    assert len(chunks) > 1
    assert max(ntokens(tok, c) for c in chunks) <= max_tokens
    # Chunks are slices of the text, in order; together they cover every character.
    covered = [False] * len(text)
    cursor = 0
    for chunk in chunks:
        start = text.find(chunk, cursor)
        assert start >= 0, chunk[:80]
        covered[start : start + len(chunk)] = [True] * len(chunk)
        cursor = start + 1
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())


def test_consecutive_chunks_overlap(tok):
    text = " ".join(f"Sentence number {i} talks about topic {i * 7}." for i in range(200))
    chunks = chunk_text(text, tok, 60, 20)
    for first, second in itertools.pairwise(chunks):
        last_sentence = re.findall(r"Sentence number \d+", first)[-1]
        assert last_sentence in second
        # Overlap is bounded: the next chunk does not just repeat the previous one.
        assert ntokens(tok, second) - ntokens(tok, first[first.index(last_sentence) :]) > 0


def test_a_sentence_longer_than_a_chunk_is_cut_on_token_boundaries(tok):
    text = "alpha " * 700
    chunks = chunk_text(text, tok, 100, 20)
    assert [ntokens(tok, c) for c in chunks] == [100] * 7
    assert "".join(chunks).count("alpha") == 700


def test_blank_text_gives_no_chunks(tok):
    assert chunk_text("  \n\n \t", tok, 100, 10) == []
    assert chunk_text("One line.", tok, 100, 10) == ["One line."]


def test_long_sentences_are_cut_between_words_within_the_budget(tok):
    rng = random.Random(7)
    alphabet = string.ascii_letters + "éßø"
    for _ in range(60):
        words = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
            for _ in range(rng.randint(50, 300))
        ]
        text = " ".join(words)
        budget = rng.choice([32, 64, 100, 254])  # above any one word's token count
        chunks = chunk_text(text, tok, budget, budget // 5)
        assert max(ntokens(tok, c) for c in chunks) <= budget
        # Every chunk starts and ends on a whole word of the text.
        for chunk in chunks:
            assert chunk.split()[0] in words and chunk.split()[-1] in words

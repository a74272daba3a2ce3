from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.config import Settings
from api.prompt import (
    SYSTEM,
    TEMPLATE_TOKENS,
    QuestionTooLong,
    build_prompt,
    estimate_tokens,
    gguf_token_counter,
)
from api.runner import local_model_path
from api.store import Hit
from tests.conftest import CORPUS_DIR


@pytest.fixture(scope="module")
def count():
    return gguf_token_counter(local_model_path())


def hit(n: int, words: int) -> Hit:
    text = " ".join(f"word{n}x{i}" for i in range(words))
    return Hit(doc_id=f"doc-{n}", source=f"s{n}.md", title="t", chunk=0, content=text, score=0.5)


def test_sources_are_numbered_and_the_question_comes_last(count):
    prompt = build_prompt("Why?", [hit(1, 5), hit(2, 5)], 2048, 256, count)
    system, user = prompt.messages
    assert system == {"role": "system", "content": SYSTEM}
    assert user["content"].startswith("Sources:\n\n[1] (s1.md)\nword1x0")
    assert "\n\n[2] (s2.md)\nword2x0" in user["content"]
    assert user["content"].endswith("Question: Why?")
    assert [s.doc_id for s in prompt.sources] == ["doc-1", "doc-2"]


def test_sources_are_cut_to_the_context_window(count):
    sources = [hit(1, 30), hit(2, 150), hit(3, 150)]
    prompt = build_prompt("What is in the sources?", sources, 700, 200, count)
    system, user = (m["content"] for m in prompt.messages)
    # What the model will see, plus the answer, fits its window (template tokens included).
    assert count(system) + count(user) + 24 + 200 <= 700
    assert prompt.tokens <= 700 - 200
    # Sources go in by rank: the first whole, the second cut at a word, the third left out.
    assert [s.doc_id for s in prompt.sources] == ["doc-1", "doc-2"]
    text = user
    assert "word1x29" in text and "word2x0" in text and "word2x149" not in text
    assert "word3x0" not in text
    cut = text.split("[2] (s2.md)\n")[1].split("\n\nQuestion")[0]
    assert cut.split()[-1] in sources[1].content.split()


def test_no_room_for_sources_still_asks_the_question(count):
    # Room for the question and a little more, not for a source's 32 tokens.
    context = 250 + TEMPLATE_TOKENS + count(SYSTEM) + 30
    prompt = build_prompt("Why?", [hit(1, 400)], context, 250, count)
    assert prompt.sources == []
    assert "no sources" in prompt.messages[1]["content"]
    assert prompt.tokens <= context - 250


def test_a_question_that_leaves_no_room_for_the_answer_is_refused(count):
    context = 250 + TEMPLATE_TOKENS + count(SYSTEM) + 30
    with pytest.raises(QuestionTooLong, match="too long for the model"):
        build_prompt("Why? " * 40, [hit(1, 400)], context, 250, count)


def test_the_estimate_does_not_undercount_prose(count):
    for path in sorted(CORPUS_DIR.glob("*.md")):
        text = path.read_text()
        assert estimate_tokens(text) >= count(text), path.name


@pytest.mark.parametrize("context,max_tokens", [(400, 100), (700, 200), (1024, 256), (2048, 64)])
def test_any_mix_of_sources_fits(count, context, max_tokens):
    corpus = [p.read_text() for p in sorted(CORPUS_DIR.glob("*.md"))]
    for start in range(0, len(corpus), 3):
        sources = [
            Hit(doc_id=f"d{i}", source=f"{i}.md", title="t", chunk=0, content=text, score=0.4)
            for i, text in enumerate(corpus[start : start + 3])
        ]
        prompt = build_prompt("How do I restore a backup?", sources, context, max_tokens, count)
        system, user = (m["content"] for m in prompt.messages)
        assert count(system) + count(user) + 24 + max_tokens <= context
        assert user.endswith("Question: How do I restore a backup?")


def test_an_answer_that_leaves_the_prompt_no_room_is_a_bad_setting(tmp_path):
    with pytest.raises(ValidationError, match="LLM_MAX_TOKENS leaves less than 256"):
        Settings(data_dir=tmp_path, llm_context_tokens=2048, llm_max_tokens=1900)
    assert Settings(data_dir=tmp_path, llm_context_tokens=2048, llm_max_tokens=1792)

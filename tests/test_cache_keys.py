from __future__ import annotations

from api.cache import answer_digest, answer_key, embedding_key, normalize_question

PARAMS = {"max_sources": 3, "temperature": 0.7, "embedder": "m1", "generator": "g1"}


def test_normalization_ignores_case_spacing_and_unicode_form():
    assert normalize_question("  How do I   RESTART\tredis? ") == "how do i restart redis?"
    assert normalize_question("ﬁle") == normalize_question("file")  # NFKC ligature


def test_answer_key_changes_with_generation_question_and_every_parameter():
    def key(generation, question, params):
        return answer_key("rag", generation, answer_digest(question, params))

    base = key("gen1", "What is X?", PARAMS)
    assert key("gen1", "  what is x?", dict(PARAMS)) == base
    assert key("gen2", "What is X?", PARAMS) != base
    assert key("gen1", "What is Y?", PARAMS) != base
    for name, value in [
        ("max_sources", 4),
        ("temperature", 0.2),
        ("embedder", "m2"),
        ("generator", "g2"),
    ]:
        assert key("gen1", "What is X?", {**PARAMS, name: value}) != base
    assert base.startswith("rag:answer:gen1:")
    assert answer_key("staging", "gen1", "d") == "staging:answer:gen1:d"  # another corpus


def test_embedding_key_depends_on_model_and_normalized_text_only():
    assert embedding_key("m1", "Hello  World") == embedding_key("m1", "hello world")
    assert embedding_key("m1", "hello") != embedding_key("m2", "hello")

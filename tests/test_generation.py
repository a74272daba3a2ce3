from __future__ import annotations

from api.generation import NO_ANSWER, ExtractiveGenerator
from api.store import Hit


def hit(content: str, source: str = "a.md", score: float = 0.5) -> Hit:
    return Hit(doc_id="doc-1", source=source, title=source, chunk=0, content=content, score=score)


def answer(question: str, *sources: Hit, sentences: int = 3) -> str:
    return "".join(ExtractiveGenerator(sentences).sentences(question, list(sources)))


def test_quotes_the_best_matching_sentences_and_cites_their_source():
    text = answer(
        "How often do backups run?",
        hit("The office has plants. Backups run every night at 02:15 with `backup.sh`."),
        hit("Restores are tested monthly. Backups are kept for 14 days.", source="b.md"),
        sentences=2,
    )
    assert (
        text
        == "Backups run every night at 02:15 with backup.sh. [1] Backups are kept for 14 days. [2]"
    )


def test_dots_inside_names_and_numbers_do_not_end_a_sentence():
    text = answer(
        "What is the redis timeout?", hit("The redis timeout is 0.25 s in api.cache today.")
    )
    assert text == "The redis timeout is 0.25 s in api.cache today. [1]"


def test_identifiers_keep_their_underscores_while_emphasis_goes():
    text = answer(
        "Which variable sets the redis timeout?",
        hit("Set `REDIS_TIMEOUT_SECONDS` in the _env_ file for the redis timeout."),
    )
    assert text == "Set REDIS_TIMEOUT_SECONDS in the env file for the redis timeout. [1]"


def test_markdown_markup_is_dropped_and_list_items_are_sentences():
    text = answer(
        "Which port does chroma use?",
        hit("## Ports\n- **Chroma** listens on port 8000\n- nginx on 8080"),
    )
    assert text == "Chroma listens on port 8000 [1]"


def test_without_sources_it_says_so_and_without_overlap_it_quotes_the_top_source():
    assert answer("Anything?") == NO_ANSWER
    assert (
        answer("zebra migration", hit("Backups run nightly with cron."))
        == "Backups run nightly with cron. [1]"
    )


def test_the_answer_is_deterministic():
    sources = [
        hit("Alpha beta gamma delta. Beta gamma epsilon zeta."),
        hit("Gamma delta eta theta."),
    ]
    assert len({answer("beta gamma delta", *sources) for _ in range(5)}) == 1

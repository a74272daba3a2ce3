"""Text and titles from uploaded files: the parsers themselves, and the limits around them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from api import extract
from api.loaders import UnreadableDocument, load_file
from tests.files import pdf_bytes


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("# Coffee Machine Care\n\nDescale monthly.", "Coffee Machine Care"),
        ("Intro line\n## Section\n# The Real Title #\nbody", "The Real Title"),
        ("#\tTabbed title", "Tabbed title"),
        ("# C#\n", "C#"),  # a closing run of #s counts only after a blank
        ("#hashtag, not a heading\n#   \n# ###\n# Later", "Later"),
    ],
)
def test_markdown_titles(text, title):
    assert load_file("notes.md", text.encode()).title == title


def test_markdown_without_a_heading_is_titled_by_its_file_name():
    assert load_file("dir/release-notes.md", b"## Only a subsection\ntext").title == "release-notes"


@pytest.mark.timeout(20)  # the old pattern took hours on this line
def test_a_heading_built_to_make_a_pattern_backtrack_is_read_at_once():
    line = "# a" + " " * 100_000 + "bx"
    assert load_file("x.md", line.encode()).title == "a bx"


PAGE = """<!doctype html><html><head><title>Pager
  Rotation</title><meta charset="utf-8"><style>p { color: red }</style>
<script>var secret = 1;</script></head>
<body><h1>Pager rotation</h1><p>The on-call engineer carries the <b>pager</b> for
seven&nbsp;days &amp; nights.</p><noscript>enable js</noscript><template>hidden</template>
<ul><li>Monday</li><li>Tuesday<br>evening</li></ul><pre>line one
line two</pre></body></html>"""


def test_html_text_keeps_inline_runs_and_drops_what_is_not_text():
    page = extract.html(PAGE)
    assert page["title"] == "Pager Rotation"
    assert page["text"] == (
        "Pager rotation\n"
        "The on-call engineer carries the pager for seven days & nights.\n"
        "Monday\nTuesday\nevening\nline one\nline two"
    )


def test_html_title_falls_back_to_the_first_h1_and_a_missing_head_end_is_tolerated():
    page = extract.html("<html><head><meta x=1><body><h1>First <i>one</i></h1><h1>Second</h1>")
    assert page == {"text": "First one\nSecond", "title": "First one"}


def test_html_through_the_child_process():
    loaded = load_file("pager.html", PAGE.encode(), timeout=30)
    assert loaded.title == "Pager Rotation" and "secret" not in loaded.text


def test_html_that_is_not_utf8_is_refused_before_any_child_starts():
    with pytest.raises(UnreadableDocument, match="not valid UTF-8"):
        load_file("latin.html", "<p>caf\xe9</p>".encode("latin-1"))


def test_at_most_two_parsers_run_at_once(monkeypatch):
    """Each child may take up to its memory cap: eight uploads at once must not mean
    eight children. (The children are stood in for here: what is checked is the limit
    around them; the tests above and test_bad_input run the real ones.)"""
    running = peak = 0
    lock = threading.Lock()

    def child(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.2)
        with lock:
            running -= 1
        return subprocess.CompletedProcess(args, 0, b'{"text": "some text", "title": null}', b"")

    monkeypatch.setattr(subprocess, "run", child)  # as api.loaders calls it
    threads = [
        threading.Thread(target=load_file, args=(f"f{i}.pdf", b"%PDF-1.4")) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert peak == 2


def test_a_parser_left_running_is_stopped_by_its_own_cpu_limit():
    """If the worker is killed while a child parses, no deadline of the worker's stops
    the child any more: its CPU limit (the deadline plus a second) does."""
    run = subprocess.run(
        [sys.executable, "-m", "api.extract", "html", "1000", "1"],
        input=b"<a" * 400_000,  # minutes of parsing
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert run.returncode in (-signal.SIGXCPU, -signal.SIGKILL), run.returncode


@pytest.mark.parametrize(
    ("markup", "text", "title"),
    [
        ("<title>T<body><p>Body text", "Body text", "T"),  # a title left open
        ("<head><title>T</title><span>first</span> text<p>para", "first text\npara", "T"),
        ("<nav><a>Home</a><a>About</a></nav>", "Home About", None),  # a menu, unspaced
        ("<select><option>A</option><option>B</option></select>", "A\nB", None),
        ("<p>line one\r\nline two</p>", "line one line two", None),  # CRLF source
        ("<template><h1>Hidden</h1></template><h1>Real</h1>", "Real", "Real"),
        ("<p>see <a href=x>the docs</a> for more</p>", "see the docs for more", None),
        ("<p>im<b>port</b>ant</p>", "important", None),  # inline markup inside a word
    ],
)
def test_html_as_pages_are_really_written(markup, text, title):
    assert extract.html(markup) == {"text": text, "title": title}


def test_the_parser_hands_back_no_more_text_than_shows_it_is_too_long():
    """A page can expand to hundreds of MB of text; the web worker gets the limit and one
    character more, enough to refuse it."""
    run = subprocess.run(
        [sys.executable, "-m", "api.extract", "pdf", "100", "10"],
        input=pdf_bytes(["word " * 100, "more " * 100], title="  Long\ttitle " * 10000),
        capture_output=True,
        check=True,
        timeout=30,
    )
    result = json.loads(run.stdout)
    assert len(result["text"]) == 101
    assert len(result["title"]) == 65536
    with pytest.raises(UnreadableDocument, match="longer than 100 characters"):
        load_file("long.pdf", pdf_bytes(["word " * 100]), max_chars=100)

"""Text extraction from uploaded PDF and HTML, run in a child process:
`python -m api.extract {pdf|html} MAX_CHARS SECONDS < file`, printing one JSON object, {"text",
"title"} or {"error"}.

Both parsers are pure Python and take untrusted input: some crafted PDFs make pypdf spin
for minutes or balloon in memory, and the standard library's HTML parser is quadratic on
some malformed markup (200 KB of "<a" took 26 s) and raises on other. A child process can
be killed on a deadline and capped in memory; a thread can be neither, and while it spins
it holds the GIL, which stops the whole worker.
"""

from __future__ import annotations

import io
import json
import logging
import math
import resource
import sys
from html.parser import HTMLParser

MEMORY_LIMIT_BYTES = 1 << 30
MAX_TITLE_READ = 65536  # characters; the caller keeps 512 of them, whitespace collapsed


def pdf(data: bytes, max_chars: int) -> dict[str, str | None]:
    from pypdf import PdfReader

    # pypdf reports recoverable damage through logging; what it raises is what counts.
    logging.getLogger("pypdf").setLevel(logging.CRITICAL)
    reader = PdfReader(io.BytesIO(data), strict=False)
    pages: list[str] = []
    total = 0
    for page in reader.pages:
        text = page.extract_text() or ""
        pages.append(text)
        total += len(text)
        if total > max_chars:  # the caller rejects it anyway; stop spending CPU on it
            break
    title = reader.metadata.title if reader.metadata else None
    return {"text": "\n\n".join(pages), "title": str(title).strip() or None if title else None}


class _HtmlText(HTMLParser):
    """Text and title as the parser streams through the page: no tree is built, so memory
    follows the text, not the markup (a parsed tree took ~200 times the page's size)."""

    SKIPPED = frozenset(("script", "style", "noscript", "template", "head"))
    # What may stand in a <head>: anything else means the body has begun, </head> or not.
    HEAD = frozenset(("title", "meta", "link", "style", "script", "base", "noscript", "template"))
    # Elements that end a line of text; any other (inline) element runs on.
    BLOCKS = frozenset(
        (
            "address article aside blockquote body br caption dd details dialog div dl dt "
            "fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr legend li "
            "main nav ol option p pre section summary table tbody td tfoot th thead tr ul"
        ).split()
    )
    # Inline elements that stand apart from their neighbours: menus of links and buttons
    # are often written without a space between them ("<a>Home</a><a>About</a>").
    APART = frozenset(("a", "button", "label", "img", "input", "select", "textarea"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] | None = None  # the first <title>'s text
        self.h1: list[str] | None = None  # the first <h1>'s, if there is no title
        self._skipping: list[str] = []  # skipped elements now open
        self._in_title = self._in_h1 = False
        self._pre = 0  # open <pre>s: inside one, a line break in the source is one

    def _body_begins(self) -> None:
        if self._skipping == ["head"]:
            self._skipping.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_title = False  # a title holds text only: a tag ends one left open
        if tag not in self.HEAD:
            self._body_begins()
        if tag == "title" and self.title is None:
            self._in_title, self.title = True, []
        elif tag in self.SKIPPED:
            self._skipping.append(tag)
        elif tag == "h1" and self.h1 is None and not self._skipping:
            self._in_h1, self.h1 = True, []
        elif tag == "pre":
            self._pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag in self.APART:
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCKS:  # <br/>, <hr/>
            self.parts.append("\n")
        elif tag in self.APART:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._skipping:
            while self._skipping.pop() != tag:
                pass
        elif tag == "h1":
            self._in_h1 = False
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag in self.APART:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            assert self.title is not None
            self.title.append(data)
            return
        if data.strip():
            self._body_begins()  # text outside any head element: the body has begun
        if self._skipping:
            return
        if not self._pre:  # elsewhere a line break is just a space
            data = data.replace("\r", " ").replace("\n", " ")
        self.parts.append(data)
        if self._in_h1:
            assert self.h1 is not None
            self.h1.append(data)


def html(markup: str) -> dict[str, str | None]:
    """The page's text, a line per block with whitespace collapsed, and its title (the
    <title>, else the first <h1>)."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    title = " ".join("".join(parser.title or parser.h1 or ()).split())
    return {"text": "\n".join(line for line in lines if line), "title": title or None}


def main() -> None:
    kind, max_chars, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    # The parent kills it at its deadline; if the parent is killed first, the kernel does,
    # a second of CPU later, rather than letting an orphan spin for hours.
    cpu = math.ceil(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    data = sys.stdin.buffer.read()
    try:
        # HTML comes as UTF-8: the parent checked and decoded it, and sends it on as such.
        result = pdf(data, max_chars) if kind == "pdf" else html(data.decode())
    # Damaged input can fail anywhere inside a parser; any failure means "unreadable".
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    # One page can hold far more than the limit: the parent (a web worker) needs only
    # enough to see that, not hundreds of MB of it in its memory.
    if (text := result.get("text")) is not None and len(text) > max_chars:
        result["text"] = text[: max_chars + 1]
    if (title := result.get("title")) is not None:
        result["title"] = title[:MAX_TITLE_READ]
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()

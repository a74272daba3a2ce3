"""Turn uploaded files into plain text and a title."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath

SUPPORTED_SUFFIXES = (".txt", ".md", ".pdf", ".html", ".htm")
PARSED_IN_CHILD = (".pdf", ".html", ".htm")
MAX_PARSERS = 2  # children parsing at once per process: each may take its memory cap
MAX_TITLE_CHARS = 512
MAX_NAME_CHARS = 512  # as a `source` given in JSON may be (api/schemas.py)


class UnsupportedFileType(ValueError):
    pass


class UnreadableDocument(ValueError):
    pass


@dataclass(frozen=True)
class LoadedText:
    name: str
    text: str
    title: str


def printable(name: str) -> str:
    """`name` as valid Unicode: a file name that is not UTF-8 reaches Python with its bad
    bytes as lone surrogates, which no JSON response, log line or Chroma record can hold;
    they become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _one_line(text: str) -> str:
    """One line, and no longer than a title given in JSON may be (api/schemas.py)."""
    return " ".join(text.split())[:MAX_TITLE_CHARS]


def _last_part(filename: str) -> PurePosixPath:
    """An uploaded file's own name, whichever separators its client used."""
    return PurePosixPath(PurePosixPath(filename.replace("\\", "/")).name)


def parsed_in_child(filename: str) -> bool:
    return _last_part(filename).suffix.lower() in PARSED_IN_CHILD


def load_file(
    filename: str, data: bytes, max_chars: int = 2_000_000, timeout: float = 20.0
) -> LoadedText:
    """Text and title of an uploaded file; `name` is reduced to its last path part. PDF
    and HTML are parsed in a child process (api/extract.py) that is killed after
    `timeout` seconds."""
    name = printable(_last_part(filename).name) or "upload"
    suffix = PurePosixPath(name).suffix.lower()
    if len(name) > MAX_NAME_CHARS:
        raise UnreadableDocument(
            f"{name[:64]}...: a file name longer than {MAX_NAME_CHARS} characters"
        )
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFileType(
            f"{name}: unsupported file type {suffix or '(none)'}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    stem = PurePosixPath(name).stem
    if suffix == ".pdf":
        text, title = _in_child("pdf", name, data, max_chars, timeout)
    elif suffix in (".html", ".htm"):
        markup = _decode(name, data).encode()  # the child reads plain UTF-8
        text, title = _in_child("html", name, markup, max_chars, timeout)
    else:
        text = _decode(name, data)
        title = _markdown_title(text) if suffix == ".md" else None
    if not text.strip():
        raise UnreadableDocument(f"{name}: no text found in the document")
    if len(text) > max_chars:
        raise UnreadableDocument(f"{name}: longer than {max_chars} characters of text")
    try:
        text.encode()
    except UnicodeEncodeError:  # a PDF's character map can decode to lone surrogates
        raise UnreadableDocument(f"{name}: the text is not valid Unicode") from None
    title = _one_line(printable(title or "")) or _one_line(stem)
    return LoadedText(name=name, text=text, title=title)


def _decode(name: str, data: bytes) -> str:
    if b"\x00" in data:
        raise UnreadableDocument(f"{name}: binary content in a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(f"{name}: not valid UTF-8 text ({exc.reason})") from exc


def _markdown_title(text: str) -> str | None:
    """The first level-one ATX heading ("# Title", "# Title #"). A line scan, not a
    regular expression: the obvious pattern backtracks for seconds on one crafted line,
    and a regex search holds the GIL, so the whole worker would stop with it."""
    for line in text.splitlines():
        if len(line) < 3 or line[0] != "#" or line[1] not in " \t":
            continue
        title = line[2:].strip()
        closed = title.rstrip("#")  # a closing run of #s counts only after a blank
        if closed != title and (not closed or closed[-1] in " \t"):
            title = closed.rstrip()
        if title:
            return title
    return None


# Parsers running at once in this process: each child may take up to its memory cap.
_parser_slots = threading.BoundedSemaphore(MAX_PARSERS)


def _in_child(
    kind: str, name: str, data: bytes, max_chars: int, timeout: float
) -> tuple[str, str | None]:
    """Text and title from `python -m api.extract`, in a child process capped in memory
    and killed after `timeout`; two at most at a time, so many uploads at once cannot each
    take the cap. A file waits its turn (each parse ends by its deadline) rather than
    being refused."""
    label = kind.upper()
    with _parser_slots:
        try:
            run = subprocess.run(
                [sys.executable, "-m", "api.extract", kind, str(max_chars), str(timeout)],
                input=data,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise UnreadableDocument(
                f"{name}: {label} text extraction took longer than {timeout:g} s"
            ) from None
    try:
        result = json.loads(run.stdout)
    except ValueError:
        raise UnreadableDocument(f"{name}: cannot read {label} (the parser died)") from None
    if "error" in result:
        raise UnreadableDocument(f"{name}: cannot read {label} ({result['error']})")
    return result["text"], result["title"]

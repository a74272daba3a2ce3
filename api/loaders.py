"""Turn uploaded files into plain text and a title."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import PurePath

from bs4 import BeautifulSoup
from pypdf import PdfReader

SUPPORTED_SUFFIXES = (".txt", ".md", ".pdf", ".html", ".htm")

# pypdf reports recoverable damage through logging; a corrupt file is judged by what it raises.
logging.getLogger("pypdf").setLevel(logging.ERROR)


class UnsupportedFileType(ValueError):
    pass


class UnreadableDocument(ValueError):
    pass


@dataclass(frozen=True)
class LoadedText:
    text: str
    title: str


def load_file(filename: str, data: bytes) -> LoadedText:
    name = PurePath(filename).name
    suffix = PurePath(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFileType(
            f"{name}: unsupported file type {suffix or '(none)'}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    stem = PurePath(name).stem
    if suffix == ".pdf":
        text, title = _pdf(name, data)
    elif suffix in (".html", ".htm"):
        text, title = _html(_decode(name, data))
    else:
        text = _decode(name, data)
        title = _markdown_title(text) if suffix == ".md" else None
    if not text.strip():
        raise UnreadableDocument(f"{name}: no text found in the document")
    return LoadedText(text=text, title=title or stem)


def _decode(name: str, data: bytes) -> str:
    if b"\x00" in data:
        raise UnreadableDocument(f"{name}: binary content in a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(f"{name}: not valid UTF-8 text ({exc.reason})") from exc


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.M)
    return match.group(1) if match else None


def _html(markup: str) -> tuple[str, str | None]:
    soup = BeautifulSoup(markup, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else None
    if not title and (h1 := soup.find("h1")):
        title = h1.get_text(strip=True)
    body = soup.body or soup
    lines = (line.strip() for line in body.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line), title or None


def _pdf(name: str, data: bytes) -> tuple[str, str | None]:
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = reader.metadata.title if reader.metadata else None
    # A damaged PDF can fail anywhere inside the parser; any failure means "unreadable".
    except Exception as exc:
        raise UnreadableDocument(f"{name}: cannot read PDF ({exc})") from exc
    return "\n\n".join(pages), (str(meta_title).strip() or None) if meta_title else None

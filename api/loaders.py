"""Turn uploaded files into plain text and a title."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath

from bs4 import BeautifulSoup

SUPPORTED_SUFFIXES = (".txt", ".md", ".pdf", ".html", ".htm")


class UnsupportedFileType(ValueError):
    pass


class UnreadableDocument(ValueError):
    pass


@dataclass(frozen=True)
class LoadedText:
    name: str
    text: str
    title: str


def load_file(
    filename: str, data: bytes, max_chars: int = 2_000_000, pdf_timeout: float = 20.0
) -> LoadedText:
    """Text and title of an uploaded file; `name` is reduced to its last path part."""
    name = PurePosixPath(filename.replace("\\", "/")).name or "upload"
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFileType(
            f"{name}: unsupported file type {suffix or '(none)'}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    stem = PurePosixPath(name).stem
    if suffix == ".pdf":
        text, title = _pdf(name, data, max_chars, pdf_timeout)
    elif suffix in (".html", ".htm"):
        text, title = _html(_decode(name, data))
    else:
        text = _decode(name, data)
        title = _markdown_title(text) if suffix == ".md" else None
    if not text.strip():
        raise UnreadableDocument(f"{name}: no text found in the document")
    if len(text) > max_chars:
        raise UnreadableDocument(f"{name}: longer than {max_chars} characters of text")
    return LoadedText(name=name, text=text, title=title or stem)


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


def _pdf(name: str, data: bytes, max_chars: int, timeout: float) -> tuple[str, str | None]:
    try:
        run = subprocess.run(
            [sys.executable, "-m", "api.pdftext", str(max_chars)],
            input=data,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnreadableDocument(
            f"{name}: PDF text extraction took longer than {timeout:g} s"
        ) from None
    try:
        result = json.loads(run.stdout)
    except ValueError:
        raise UnreadableDocument(f"{name}: cannot read PDF (the parser died)") from None
    if "error" in result:
        raise UnreadableDocument(f"{name}: cannot read PDF ({result['error']})")
    return result["text"], result["title"]

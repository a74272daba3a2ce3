"""PDF text extraction in a child process: `python -m api.pdftext MAX_CHARS < file.pdf`.

pypdf is pure Python and some crafted PDFs make it spin for minutes or balloon in memory;
a separate process can be killed on a deadline and capped in memory, a thread cannot.
Prints one JSON object: {"text", "title"} or {"error"}.
"""

from __future__ import annotations

import io
import json
import logging
import resource
import sys

MEMORY_LIMIT_BYTES = 1 << 30


def extract(data: bytes, max_chars: int) -> dict[str, str | None]:
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


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    data = sys.stdin.buffer.read()
    try:
        result: dict[str, str | None] = extract(data, int(sys.argv[1]))
    # A damaged PDF can fail anywhere inside the parser; any failure means "unreadable".
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()

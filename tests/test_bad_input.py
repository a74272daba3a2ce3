"""Every kind of bad input gets its 4xx with a JSON `detail`, and the store is left as it was."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.telemetry import flusher
from tests.conftest import services_of
from tests.files import MARKDOWN, pdf_bytes, slow_pdf, surrogate_pdf

GOOD = {"text": "The deploy freeze starts on the 20th of December.", "source": "freeze.txt"}


@pytest.fixture
def seeded(make_client):
    with make_client(
        max_request_bytes=64 * 1024,
        max_upload_bytes=8 * 1024,
        max_document_chars=20_000,
        max_question_chars=300,
        max_documents_per_request=5,
    ) as client:
        assert client.post("/documents", json={"documents": [GOOD]}).status_code == 200
        yield client


def snapshot(client: TestClient) -> tuple[int, int, list[str]]:
    chunks, docs = services_of(client).store._connect()
    return chunks.count(), docs.count(), sorted(docs.get(include=[])["ids"])


def expect(client: TestClient, response, status: int, fragment: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"], body
    if fragment:
        assert fragment in json.dumps(body["detail"]), body


QUERY_CASES = {
    "question too long": ({"question": "x" * 301}, "longer than 300"),
    "blank question": ({"question": "   "}, "blank"),
    "missing question": ({"max_sources": 3}, "question"),
    "max_sources zero": ({"question": "freeze?", "max_sources": 0}, "max_sources"),
    "max_sources 21": ({"question": "freeze?", "max_sources": 21}, "max_sources"),
    "temperature negative": ({"question": "freeze?", "temperature": -1}, "temperature"),
    "wrong type": ({"question": ["a list"]}, "question"),
    "unknown field": ({"question": "freeze?", "top_k": 3}, "top_k"),
}


@pytest.mark.parametrize("case", QUERY_CASES)
def test_bad_queries_are_422(seeded, case):
    body, fragment = QUERY_CASES[case]
    expect(seeded, seeded.post("/query", json=body), 422, fragment)


INGEST_CASES = {
    "empty text": ({"documents": [{"text": ""}]}, 422),
    "whitespace only": ({"documents": [GOOD, {"text": " \n\t "}]}, 422),
    "no documents": ({"documents": []}, 422),
    "too many documents": ({"documents": [{"text": f"doc {i}"} for i in range(6)]}, 422),
    "document too long": ({"documents": [{"text": "word " * 5000}]}, 422),
    "nested metadata": ({"documents": [{"text": "x y z", "metadata": {"a": {"b": 1}}}]}, 422),
    "bad metadata key": ({"documents": [{"text": "x y z", "metadata": {"$where": 1}}]}, 422),
    "unknown field": ({"documents": [{"text": "x y z", "owner": "me"}]}, 422),
    "body too large": ({"documents": [{"text": "y" * 70_000}]}, 413),
    "int too large": ({"documents": [{"text": "x y z", "metadata": {"n": 10**30}}]}, 422),
}


@pytest.mark.parametrize("case", INGEST_CASES)
def test_bad_json_documents_change_nothing(seeded, case):
    body, status = INGEST_CASES[case]
    before = snapshot(seeded)
    expect(seeded, seeded.post("/documents", json=body), status)
    assert snapshot(seeded) == before


RAW_CASES = {
    "malformed json": (b'{"documents": [', "application/json", 422),
    "json but not an object": (b'"hello"', "application/json", 422),
    "unsupported content type": (b"text=hello", "application/x-www-form-urlencoded", 415),
    "no content type": (b"hello", "", 415),
}


@pytest.mark.parametrize("case", RAW_CASES)
def test_bad_bodies(seeded, case):
    data, kind, status = RAW_CASES[case]
    before = snapshot(seeded)
    expect(seeded, seeded.post("/documents", content=data, headers={"content-type": kind}), status)
    assert snapshot(seeded) == before


@pytest.mark.parametrize(
    "path,raw",
    [
        ("/query", b'{"question": "freeze \\ud800?"}'),
        ("/documents", b'{"documents": [{"text": "x \\ud800 z"}]}'),
    ],
)
def test_lone_surrogates_are_422(seeded, path, raw):
    before = snapshot(seeded)
    response = seeded.post(path, content=raw, headers={"content-type": "application/json"})
    expect(seeded, response, 422)
    assert snapshot(seeded) == before


@pytest.mark.parametrize(
    "raw",
    [
        b'{"question": "x", "temperature": NaN}',
        b'{"question": "x", "temperature": Infinity}',
        b'{"question": "x", "max_sources": 1e999}',
    ],
)
def test_non_finite_numbers_are_422(seeded, raw):
    response = seeded.post("/query", content=raw, headers={"content-type": "application/json"})
    expect(seeded, response, 422)


def test_validation_errors_are_located_in_the_body_and_documented(seeded):
    detail = seeded.post("/query", json={"max_sources": 3}).json()["detail"]
    assert [(e["type"], e["loc"]) for e in detail] == [("missing", ["body", "question"])]
    operation = seeded.get("/openapi.json").json()["paths"]["/query"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "question"
    ]
    assert {"200", "422", "503"} <= set(operation["responses"])


def test_malformed_query_json(seeded):
    response = seeded.post(
        "/query", content=b"{not json", headers={"content-type": "application/json"}
    )
    expect(seeded, response, 422)


GOOD_FILE = ("files", ("coffee.md", MARKDOWN, "text/markdown"))
UPLOAD_CASES = {
    "unsupported type": (
        [GOOD_FILE, ("files", ("tool.exe", b"MZ\x90\x00", "application/x"))],
        415,
        "unsupported file type",
    ),
    "no extension": ([("files", ("README", b"hello there", "text/plain"))], 415, "(none)"),
    "corrupt pdf": (
        [GOOD_FILE, ("files", ("bad.pdf", b"%PDF-1.7\n1 0 obj<<", "application/pdf"))],
        422,
        "cannot read PDF",
    ),
    "pdf without text": (
        [("files", ("blank.pdf", pdf_bytes([]), "application/pdf"))],
        422,
        "no text",
    ),
    "empty file": ([GOOD_FILE, ("files", ("empty.txt", b"", "text/plain"))], 422, "no text"),
    "binary in txt": ([("files", ("x.txt", b"\x00\x01\x02", "text/plain"))], 422, "binary"),
    "not utf-8": ([("files", ("x.md", "café".encode("latin-1"), "text/plain"))], 422, "UTF-8"),
    "file too large": (
        [GOOD_FILE, ("files", ("big.txt", b"a " * 5000, "text/plain"))],
        413,
        "larger than",
    ),
    "wrong field name": ([("upload", ("coffee.md", MARKDOWN, "text/markdown"))], 422, "files"),
    # pypdf hands on what a font's character map says, lone surrogates too: no response,
    # log line or Chroma record can hold them.
    "pdf text that is not unicode": (
        [GOOD_FILE, ("files", ("cmap.pdf", surrogate_pdf(), "application/pdf"))],
        422,
        "not valid Unicode",
    ),
    "file name too long": (
        [GOOD_FILE, ("files", ("n" * 600 + ".txt", b"hello", "text/plain"))],
        422,
        "longer than 512",
    ),
}


@pytest.mark.parametrize("case", UPLOAD_CASES)
def test_bad_uploads_change_nothing(seeded, case):
    files, status, fragment = UPLOAD_CASES[case]
    before = snapshot(seeded)
    expect(seeded, seeded.post("/documents", files=files), status, fragment)
    assert snapshot(seeded) == before


@pytest.mark.parametrize("method", ["get", "delete"])
def test_unknown_document_is_404(seeded, method):
    before = snapshot(seeded)
    expect(seeded, getattr(seeded, method)("/documents/doc-0000"), 404, "no document")
    assert snapshot(seeded) == before


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "many"}]
)
def test_bad_pagination_is_422(seeded, params):
    expect(seeded, seeded.get("/documents", params=params), 422)


SLOW_FILES = {
    "pdf": lambda: ("slow.pdf", slow_pdf(), "application/pdf"),
    # The standard library's HTML parser is quadratic on unclosed tags: minutes here.
    "html": lambda: ("slow.html", b"<a" * 400_000, "text/html"),
}


@pytest.mark.parametrize("kind", SLOW_FILES)
def test_a_file_that_would_take_minutes_to_parse_is_cut_off(make_client, kind):
    with make_client(extract_timeout_seconds=2) as client:
        before = snapshot(client)
        files = [("files", SLOW_FILES[kind]())]
        response = client.post("/documents", files=files)
        expect(client, response, 422, f"{kind.upper()} text extraction took longer than 2 s")
        assert snapshot(client) == before
        ok = client.post(
            "/documents", files=[("files", ("fine.pdf", pdf_bytes(["Fine."]), "application/pdf"))]
        )
        assert ok.status_code == 200


def test_markup_the_html_parser_rejects_is_422(seeded):
    before = snapshot(seeded)
    files = [("files", ("broken.html", b"<p>Fine so far</p>" + b"<![" * 50, "text/html"))]
    expect(seeded, seeded.post("/documents", files=files), 422, "cannot read HTML")
    assert snapshot(seeded) == before


def test_a_pathological_markdown_heading_is_read_at_once(seeded):
    # One line that made the old title pattern backtrack for hours (cubic in its length).
    text = b"# a" + b" " * 5000 + b"bx\n\nThe body of the note."
    files = [("files", ("heading.md", text, "text/markdown"))]
    response = seeded.post("/documents", files=files)
    assert response.status_code == 200, response.text
    assert response.json()["documents"][0]["title"] == "a bx"


def test_upload_names_lose_their_directories(seeded):
    files = [("files", ("../../etc/notes.txt", b"Path parts are dropped.", "text/plain"))]
    response = seeded.post("/documents", files=files)
    assert response.status_code == 200
    assert response.json()["documents"][0]["source"] == "notes.txt"


def test_too_many_files_is_400(seeded):
    files = [("files", (f"f{i}.txt", b"some words here", "text/plain")) for i in range(6)]
    before = snapshot(seeded)
    expect(seeded, seeded.post("/documents", files=files), 400, "Too many files")
    assert snapshot(seeded) == before


def chunked(data: bytes, size: int = 4096):
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("path", ["/query", "/documents"])
def test_a_chunked_body_over_the_limit_is_413(seeded, path):
    body = json.dumps({"question": "x" * 70_000, "documents": []}).encode()
    before = snapshot(seeded)
    response = seeded.post(
        path, content=chunked(body), headers={"content-type": "application/json"}
    )
    expect(seeded, response, 413, "larger than")
    assert snapshot(seeded) == before


def _rejected(client: TestClient) -> float:
    flusher.flush()  # increments reach the exposition on the flusher's tick
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('rag_ingest_documents_total{result="rejected"}'):
            return float(line.split()[-1])
    return 0.0


def test_every_refused_document_is_counted_as_rejected(seeded):
    before = _rejected(seeded)
    refused = [
        seeded.post("/documents", files=[("files", ("a.exe", b"MZ", "application/octet-stream"))]),
        seeded.post("/documents", files=[("files", ("b.txt", b"\xff\xfe\x00", "text/plain"))]),
        seeded.post("/documents", json={"documents": [{"text": " \n\t "}]}),
    ]
    assert [r.status_code for r in refused] == [415, 422, 422]
    assert _rejected(seeded) - before == 3

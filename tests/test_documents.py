"""Ingestion, listing, deletion and reload on the embedded store (real Chroma, real model)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from api.ingest import NewDocument, document_id
from api.store import MAX_PROBES, EmbeddedStoreBusy, EmbeddingModelMismatch, VectorStore
from tests.conftest import ROOT, make_settings, services_of
from tests.files import HTML, MARKDOWN, pdf_bytes, surrogate_pdf
from tests.servers import wait_until

LONG = " ".join(
    f"Runbook step {i}: check the replica number {i} for stale locks." for i in range(120)
)


def ingest(client: TestClient, *docs: dict) -> list[dict]:
    response = client.post("/documents", json={"documents": list(docs)})
    assert response.status_code == 200, response.text
    return response.json()["documents"]


def chunk_count(client: TestClient, doc_id: str | None = None) -> int:
    chunks, _ = services_of(client).store._connect()
    if doc_id is None:
        return chunks.count()
    return len(chunks.get(where={"doc_id": doc_id}, include=[])["ids"])


def test_json_ingest_is_idempotent_and_content_addressed(client):
    first = ingest(client, {"text": LONG, "source": "steps.txt", "metadata": {"team": "sre"}})[0]
    assert first["status"] == "created" and first["chunks"] > 1
    assert first["id"] == document_id(LONG)
    chunks_before = chunk_count(client)
    again = ingest(client, {"text": LONG + "\n", "source": "other-name.txt"})[0]
    assert again == {**again, "id": first["id"], "status": "unchanged"}
    assert chunk_count(client) == chunks_before == first["chunks"]
    detail = client.get(f"/documents/{first['id']}").json()
    assert detail["source"] == "steps.txt"
    assert detail["metadata"] == {"team": "sre"}
    assert detail["text"] == LONG and detail["chunks"] == first["chunks"]
    assert detail["origin"] == "api" and detail["ingested_at"].endswith("+00:00")


def test_uploads_of_every_supported_type(client):
    files = [
        ("files", ("pager.html", HTML, "text/html")),
        ("files", ("coffee.md", MARKDOWN, "text/markdown")),
        ("files", ("notes.txt", b"Plants need water twice a week.", "text/plain")),
        (
            "files",
            (
                "budget.pdf",
                pdf_bytes(["The travel budget is 4000 euros per year."], title="Travel Budget"),
                "application/pdf",
            ),
        ),
    ]
    response = client.post("/documents", files=files)
    assert response.status_code == 200, response.text
    docs = {d["source"]: d for d in response.json()["documents"]}
    assert {s: d["title"] for s, d in docs.items()} == {
        "pager.html": "Pager Rotation",
        "coffee.md": "Coffee Machine Care",
        "notes.txt": "notes",
        "budget.pdf": "Travel Budget",
    }
    html_text = client.get(f"/documents/{docs['pager.html']['id']}").json()["text"]
    assert "seven days" in html_text and "secret" not in html_text and "color" not in html_text
    answer = client.post("/query", json={"question": "What is the yearly travel budget?"}).json()
    assert answer["sources"][0]["document"] == "budget.pdf"
    assert "4000 euros" in answer["answer"] and "[1]" in answer["answer"]


def test_listing_is_paginated(client):
    ids = {
        d["id"]
        for d in ingest(client, *({"text": f"Fact {i}: the answer is {i * 3}."} for i in range(7)))
    }
    seen: list[str] = []
    for offset in (0, 3, 6):
        page = client.get("/documents", params={"limit": 3, "offset": offset}).json()
        assert page["total"] == 7 and page["limit"] == 3 and page["offset"] == offset
        seen += [d["id"] for d in page["documents"]]
    assert len(seen) == 7 and set(seen) == ids


def test_delete_removes_every_chunk(client):
    doc = ingest(client, {"text": LONG, "source": "steps.txt"})[0]
    keep = ingest(client, {"text": "Unrelated: the office closes at six.", "source": "o.txt"})[0]
    assert chunk_count(client, doc["id"]) == doc["chunks"] > 1
    response = client.delete(f"/documents/{doc['id']}")
    assert response.status_code == 200 and response.json() == {"id": doc["id"], "deleted": True}
    assert chunk_count(client, doc["id"]) == 0
    assert client.get(f"/documents/{doc['id']}").status_code == 404
    assert client.delete(f"/documents/{doc['id']}").status_code == 404
    sources = client.post("/query", json={"question": "stale locks on replicas"}).json()["sources"]
    assert {s["document_id"] for s in sources} == {keep["id"]}


def test_reload_follows_the_documents_folder(make_client, tmp_path):
    folder = tmp_path / "documents"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Alpha\n\nAlpha servers restart at midnight.")
    (folder / "sub" / "b.txt").write_text("Beta backups run hourly.")
    (folder / ".hidden.md").write_text("never ingested")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    with make_client(ingest_on_start=True) as client:
        listed = client.get("/documents").json()
        assert sorted(d["source"] for d in listed["documents"]) == ["a.md", "sub/b.txt"]
        assert {d["origin"] for d in listed["documents"]} == {"directory"}

        (folder / "a.md").write_text("# Alpha\n\nAlpha servers now restart at noon.")
        (folder / "sub" / "b.txt").unlink()
        (folder / "c.html").write_text("<title>Gamma</title><p>Gamma runs on Fridays.</p>")
        report = client.post("/documents/reload").json()
        assert sorted(d["source"] for d in report["created"]) == ["a.md", "c.html"]
        assert report["unchanged"] == 0 and len(report["removed"]) == 2  # old a.md, b.txt
        assert list(report["errors"]) == ["broken.pdf"]
        listed = client.get("/documents").json()
        assert sorted(d["source"] for d in listed["documents"]) == ["a.md", "c.html"]
        assert client.post("/documents/reload").json()["unchanged"] == 2
        # Documents that came through the API are not the folder's to remove.
        ingest(client, {"text": "API-only document.", "source": "api.txt"})
        assert client.post("/documents/reload").json()["removed"] == []
        assert client.get("/documents").json()["total"] == 3


def test_files_no_response_can_name_are_reported_and_the_rest_ingested(make_client, tmp_path):
    """A PDF whose text is not valid Unicode, and a file whose name is not UTF-8: each is
    an error of its own, on the first start's ingest as on a reload, and the files beside
    them are ingested. Before, either one failed the whole reload (a 500, or a 503 from
    Chroma refusing the name), and on a first start stopped the worker from booting."""
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nThe good file is ingested.")
    (folder / "cmap.pdf").write_bytes(surrogate_pdf())
    latin1 = os.fsencode(folder) + b"/caf\xe9.txt"  # "café" in Latin-1: not UTF-8
    with open(latin1, "wb") as handle:
        handle.write(b"Named in Latin-1.")
    with make_client(ingest_on_start=True) as client:
        listed = client.get("/documents").json()
        assert [d["source"] for d in listed["documents"]] == ["good.md"]
        report = client.post("/documents/reload")
        assert report.status_code == 200
        errors = report.json()["errors"]
        assert set(errors) == {"caf\ufffd.txt", "cmap.pdf"}
        assert "not valid UTF-8" in errors["caf\ufffd.txt"]
        assert "not valid Unicode" in errors["cmap.pdf"]
        assert report.json()["unchanged"] == 1


def test_a_failed_write_leaves_no_partial_document(client, monkeypatch):
    store = services_of(client).store
    chunks, _ = store._connect()
    monkeypatch.setattr(store._client, "get_max_batch_size", lambda: 2)
    calls = {"n": 0}
    real_upsert = type(chunks).upsert

    def failing_upsert(self, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch landed, the second fails
            raise RuntimeError("disk full")
        return real_upsert(self, **kwargs)

    monkeypatch.setattr(type(chunks), "upsert", failing_upsert)
    response = client.post("/documents", json={"documents": [{"text": LONG}]})
    assert response.status_code == 503
    assert calls["n"] == 2
    monkeypatch.undo()
    assert chunk_count(client) == 0
    assert client.get("/documents").json()["total"] == 0
    # The same content goes in cleanly afterwards.
    assert ingest(client, {"text": LONG})[0]["status"] == "created"


def test_embedded_store_refuses_a_second_process(client, tmp_path):
    settings = make_settings(tmp_path)
    with pytest.raises(EmbeddedStoreBusy, match="CHROMA_HOST"):
        VectorStore(settings, "any-model")


def test_a_store_built_with_another_model_is_refused(make_client, tmp_path, chroma_server):
    prefix = "mismatch"
    server = {"chroma_host": "127.0.0.1", "chroma_port": chroma_server.port}
    with make_client(chroma_collection_prefix=prefix, **server) as client:
        ingest(client, {"text": "Vectors from the int8 model."})
    with (
        pytest.raises(EmbeddingModelMismatch, match="EMBED_PRECISION"),
        make_client(
            chroma_collection_prefix=prefix, embed_precision="fp32", ingest_on_start=True, **server
        ),
    ):
        pass


@pytest.mark.timeout(120)  # without bounds on Chroma's calls, this test hangs
def test_a_chroma_that_stops_answering_is_a_503_and_not_a_hang(make_client, chroma_server):
    server = {"chroma_host": "127.0.0.1", "chroma_port": chroma_server.port}
    with make_client(chroma_collection_prefix="frozen", chroma_timeout_seconds=5, **server) as c:
        ingest(c, {"text": "The freezer holds samples at minus eighty degrees."})
        assert "rag_store_documents 1.0" in c.get("/metrics").text
        chroma_server.pause()  # it keeps its socket, and answers nothing
        try:
            ready = c.get("/ready")
            assert ready.status_code == 503
            assert "no answer within" in ready.json()["dependencies"]["chroma"]["detail"]
            # The replica's own metrics still come; only the store's gauges are missing.
            scraped = c.get("/metrics")
            assert scraped.status_code == 200 and "http_server_request_duration" in scraped.text
            assert "rag_store_documents" not in scraped.text
            answer = c.post("/query", json={"question": "How cold is the freezer?"})
            assert answer.status_code == 503 and "timed out" in answer.json()["detail"]
            # The failure made the store find its collections again on the next call:
            # that, too, is bounded (a new client's first calls would not be).
            again = c.post("/query", json={"question": "How warm is the freezer?"})
            assert again.status_code == 503 and "timed out" in again.json()["detail"]
        finally:
            chroma_server.resume()
        wait_until(lambda: c.get("/ready").status_code == 200, 30, "ready again")
        assert "rag_store_documents 1.0" in c.get("/metrics").text
        assert c.post("/query", json={"question": "How cold is the freezer?"}).status_code == 200


def test_gunicorn_refuses_several_workers_on_the_embedded_store(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", "import api.gunicorn_conf"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "WEB_CONCURRENCY": "2", "DATA_DIR": str(tmp_path)},
    )
    assert run.returncode != 0
    assert "needs a Chroma server" in run.stderr


def test_reload_keeps_content_that_another_file_still_holds(make_client, tmp_path):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "a.md").write_text("# Same\n\nIdentical runbook text.")
    (folder / "copy-of-a.md").write_text("# Same\n\nIdentical runbook text.")
    with make_client(ingest_on_start=True) as client:
        assert client.get("/documents").json()["total"] == 1
        (folder / "a.md").unlink()
        report = client.post("/documents/reload").json()
        assert report["removed"] == [] and report["unchanged"] == 1
        assert client.get("/documents").json()["total"] == 1


def test_reload_of_a_missing_folder_changes_nothing(make_client, tmp_path):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nSomething worth keeping.")
    with make_client(ingest_on_start=True) as client:
        folder.rename(tmp_path / "moved")
        response = client.post("/documents/reload")
        assert response.status_code == 409 and "not a directory" in response.json()["detail"]
        assert client.get("/documents").json()["total"] == 1


def test_a_second_writer_never_breaks_a_committed_document(client, monkeypatch):
    """Two workers ingest the same content; the second one's write fails. The first one's
    committed document must stay whole."""
    store = services_of(client).store
    first = ingest(client, {"text": LONG, "source": "steps.txt"})[0]
    prepared = store.get_document(first["id"])
    chunks, _ = store._connect()

    def failing_upsert(self, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(chunks), "upsert", failing_upsert)
    vectors = services_of(client).embedder.embed(["x"] * first["chunks"])
    store.write_document(prepared, LONG, ["x"] * first["chunks"], vectors)  # sees the commit
    monkeypatch.undo()
    assert chunk_count(client, first["id"]) == first["chunks"]
    hits = client.post("/query", json={"question": "stale locks on replicas"}).json()
    assert hits["sources"][0]["document_id"] == first["id"]


def _committed_without_chunks(client: TestClient) -> list[str]:
    _, docs = services_of(client).store._connect()
    return [d for d in docs.get(include=[])["ids"] if not chunk_count(client, d)]


def test_a_delete_racing_a_rewrite_of_the_same_content_leaves_no_empty_document(client):
    """Another worker writes the same content again while this one deletes it, between
    the delete's two steps: the rewrite's chunks go with the delete. The delete then wins
    outright instead of leaving a record that no search can find."""
    services = services_of(client)
    (doc,) = ingest(client, {"text": LONG, "source": "steps.txt"})
    chunks, _ = services.store._connect()
    real_delete = chunks.delete

    def delete_after_a_rewrite(**kwargs):
        if kwargs.get("where") == {"doc_id": doc["id"]}:
            chunks.delete = real_delete  # once
            again = services.ingestor.ingest([NewDocument(LONG, "steps.txt", "api")])
            assert again[0].status == "created"  # the record had gone: written anew
        return real_delete(**kwargs)

    chunks.delete = delete_after_a_rewrite
    try:
        assert client.delete(f"/documents/{doc['id']}").status_code == 200
    finally:
        chunks.delete = real_delete
    assert client.get(f"/documents/{doc['id']}").status_code == 404
    assert _committed_without_chunks(client) == []
    assert chunk_count(client, doc["id"]) == 0  # nor chunks without their record


def test_a_write_whose_chunks_a_delete_removed_puts_them_back(client):
    """The reverse order: a delete of the same content removes this writer's chunks after
    they were written and before the record is: the writer, checking after its commit,
    writes them again."""
    services = services_of(client)
    chunks, docs = services.store._connect()
    doc_id = document_id(LONG)
    real_upsert = docs.upsert

    def upsert_after_a_delete(**kwargs):
        docs.upsert = real_upsert  # once
        chunks.delete(where={"doc_id": doc_id})  # the other worker's delete, mid-write
        return real_upsert(**kwargs)

    docs.upsert = upsert_after_a_delete
    try:
        (doc,) = ingest(client, {"text": LONG, "source": "steps.txt"})
    finally:
        docs.upsert = real_upsert
    assert doc["id"] == doc_id and chunk_count(client, doc_id) == doc["chunks"]
    assert _committed_without_chunks(client) == []


def test_probes_of_a_frozen_store_do_not_pile_up_threads(make_client, chroma_server):
    server = {"chroma_host": "127.0.0.1", "chroma_port": chroma_server.port}
    with make_client(chroma_collection_prefix="piles", chroma_timeout_seconds=30, **server) as c:
        chroma_server.pause()
        try:
            with ThreadPoolExecutor(12) as pool:  # a dozen probes at once, none answered
                answers = list(pool.map(lambda _: c.get("/ready"), range(12)))
            waiting = [t for t in threading.enumerate() if t.name == "store-probe"]
            assert len(waiting) <= MAX_PROBES
            details = {a.json()["dependencies"]["chroma"]["detail"] for a in answers}
            assert all(a.status_code == 503 for a in answers)
            assert any("earlier probes still have no answer" in d for d in details)
        finally:
            chroma_server.resume()
        wait_until(lambda: c.get("/ready").status_code == 200, 60, "ready again")

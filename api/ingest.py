"""Ingestion: validate, chunk, embed, then write each document whole.

Everything that can reject input (empty text, unreadable files) runs before the first
write, so a rejected request leaves the store as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from api.cache import Cache
from api.chunking import chunk_text
from api.embeddings import Embedder, Vectors
from api.loaders import SUPPORTED_SUFFIXES, UnreadableDocument, load_file
from api.store import StoredDocument, VectorStore

log = structlog.get_logger(__name__)

DIRECTORY_ORIGIN = "directory"


class EmptyDocument(ValueError):
    pass


@dataclass(frozen=True)
class NewDocument:
    text: str
    source: str
    origin: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestResult:
    id: str
    source: str
    title: str
    chunks: int
    status: Literal["created", "unchanged"]


@dataclass(frozen=True)
class ReloadReport:
    created: list[IngestResult]
    unchanged: int
    removed: list[str]
    errors: dict[str, str]


@dataclass(frozen=True)
class _Prepared:
    doc: StoredDocument
    text: str
    chunks: list[str]
    vectors: Vectors


def clean_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def document_id(text: str) -> str:
    """Same content, same id: re-ingesting is a no-op wherever it comes from."""
    return "doc-" + hashlib.sha256(clean_text(text).encode()).hexdigest()[:32]


def iter_files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and p.suffix.lower() in SUPPORTED_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        else:
            found.append(path)
    return found


class Ingestor:
    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        cache: Cache | None,
        chunk_tokens: int,
        overlap_tokens: int,
    ) -> None:
        self._embedder = embedder
        self._store = store
        self._cache = cache
        self._chunk_tokens = chunk_tokens
        self._overlap = overlap_tokens

    def ingest(self, documents: list[NewDocument]) -> list[IngestResult]:
        prepared: dict[str, _Prepared] = {}
        results: list[IngestResult] = []
        for position, new in enumerate(documents):
            text = clean_text(new.text)
            if not text:
                raise EmptyDocument(f"document {position} ({new.source}) has no text")
            doc_id = document_id(text)
            if doc_id in prepared or self._store.has_document(doc_id):
                results.append(
                    IngestResult(doc_id, new.source, new.title or new.source, 0, "unchanged")
                )
                continue
            chunks = chunk_text(text, self._embedder.counter, self._chunk_tokens, self._overlap)
            title = new.title or new.source
            doc = StoredDocument(
                id=doc_id,
                source=new.source,
                title=title,
                origin=new.origin,
                ingested_at=datetime.now(UTC).isoformat(timespec="seconds"),
                chunks=len(chunks),
                chars=len(text),
                metadata=dict(new.metadata),
            )
            prepared[doc_id] = _Prepared(doc, text, chunks, self._embedder.embed(chunks))
            results.append(IngestResult(doc_id, new.source, title, len(chunks), "created"))
        if not prepared:
            return results
        try:
            for item in prepared.values():
                self._store.write_document(item.doc, item.text, item.chunks, item.vectors)
                log.info(
                    "document ingested",
                    doc_id=item.doc.id,
                    source=item.doc.source,
                    chunks=len(item.chunks),
                )
        finally:
            self._corpus_changed()
        return results

    def delete(self, doc_id: str) -> bool:
        deleted = self._store.delete_document(doc_id)
        if deleted:
            self._corpus_changed()
            log.info("document deleted", doc_id=doc_id)
        return deleted

    def reload(self, directory: Path) -> ReloadReport:
        """Make the store's copy of `directory` match it: new and changed files are
        ingested, files gone from it are removed. Unreadable files are reported, not fatal."""
        known = self._store.documents_from(DIRECTORY_ORIGIN)
        present: set[str] = set()
        created: list[IngestResult] = []
        stale: list[str] = []  # ids of earlier versions of files that changed
        errors: dict[str, str] = {}
        unchanged = 0
        for path in iter_files([directory]) if directory.is_dir() else []:
            source = path.relative_to(directory).as_posix()
            present.add(source)
            try:
                loaded = load_file(path.name, path.read_bytes())
            except (UnreadableDocument, OSError) as exc:
                errors[source] = str(exc)
                continue
            if known.get(source) == document_id(loaded.text):
                unchanged += 1
                continue
            result = self.ingest(
                [NewDocument(loaded.text, source, DIRECTORY_ORIGIN, loaded.title)]
            )[0]
            if result.status == "created":
                created.append(result)
            else:
                unchanged += 1
            if source in known and known[source] != result.id:
                stale.append(known[source])
        removed = stale + [known[s] for s in sorted(set(known) - present)]
        for doc_id in removed:
            self.delete(doc_id)
        return ReloadReport(created, unchanged, removed, errors)

    def _corpus_changed(self) -> None:
        if self._cache is not None:
            self._cache.bump_generation()

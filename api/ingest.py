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

from api import telemetry
from api.cache import Cache
from api.chunking import chunk_text
from api.config import Settings
from api.embeddings import Embedder, Vectors
from api.loaders import SUPPORTED_SUFFIXES, UnreadableDocument, load_file, printable
from api.store import StoredDocument, VectorStore
from api.telemetry import metrics

log = structlog.get_logger(__name__)

DIRECTORY_ORIGIN = "directory"


class EmptyDocument(ValueError):
    pass


class DocumentsDirMissing(RuntimeError):
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
        self, embedder: Embedder, store: VectorStore, cache: Cache | None, settings: Settings
    ) -> None:
        self._embedder = embedder
        self._store = store
        self._cache = cache
        self._settings = settings

    def ingest(self, documents: list[NewDocument]) -> list[IngestResult]:
        prepared: dict[str, _Prepared] = {}
        results: list[IngestResult] = []
        for position, new in enumerate(documents):
            text = clean_text(new.text)
            if not text:  # counted as rejected by whoever answers for it
                raise EmptyDocument(f"document {position} ({new.source}) has no text")
            doc_id = document_id(text)
            if doc_id in prepared:
                first = prepared[doc_id].doc
                results.append(
                    IngestResult(doc_id, first.source, first.title, first.chunks, "unchanged")
                )
                continue
            if (stored := self._store.get_document(doc_id, with_text=False)) is not None:
                results.append(
                    IngestResult(doc_id, stored.source, stored.title, stored.chunks, "unchanged")
                )
                continue
            chunks = chunk_text(
                text,
                self._embedder.counter,
                self._settings.chunk_tokens,
                self._settings.chunk_overlap_tokens,
            )
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
            with telemetry.stage(
                "embed", metrics.EMBED_DURATION, {"kind": "document"}, {"rag.chunks": len(chunks)}
            ):
                vectors = self._embedder.embed(chunks)
            prepared[doc_id] = _Prepared(doc, text, chunks, vectors)
            results.append(IngestResult(doc_id, new.source, title, len(chunks), "created"))
        unchanged = len(results) - len(prepared)
        telemetry.count(metrics.INGESTED, unchanged, result="unchanged")
        if not prepared:
            return results
        try:
            for item in prepared.values():
                try:
                    self._store.write_document(item.doc, item.text, item.chunks, item.vectors)
                except Exception:
                    telemetry.count(metrics.INGESTED, result="failed")
                    raise
                telemetry.count(metrics.INGESTED, result="created")
                telemetry.count(metrics.INGESTED_CHUNKS, len(item.chunks))
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

    def ingest_file(self, path: Path, source: str, origin: str) -> IngestResult:
        if (shown := printable(source)) != source:  # neither the store nor JSON holds it
            raise UnreadableDocument(f"{shown}: the file name is not valid UTF-8; rename the file")
        limits = self._settings
        loaded = load_file(
            path.name, path.read_bytes(), limits.max_document_chars, limits.extract_timeout_seconds
        )
        return self.ingest([NewDocument(loaded.text, source, origin, loaded.title)])[0]

    def reload(self, directory: Path) -> ReloadReport:
        """Make the store's copy of `directory` match it: new and changed files are
        ingested, documents no file holds any more are removed. An unreadable file is
        reported and keeps its last good version."""
        if not directory.is_dir():
            # A missing mount must not read as "every file was deleted".
            raise DocumentsDirMissing(
                f"DOCUMENTS_DIR {directory} is not a directory; nothing was changed"
            )
        known = self._store.documents_from(DIRECTORY_ORIGIN)
        keep: set[str] = set()  # ids some file still holds (identical files share one)
        created: list[IngestResult] = []
        errors: dict[str, str] = {}
        unchanged = 0
        for path in iter_files([directory]):
            source = path.relative_to(directory).as_posix()
            try:
                result = self.ingest_file(path, source, DIRECTORY_ORIGIN)
            except (UnreadableDocument, EmptyDocument, OSError) as exc:
                telemetry.count(metrics.INGESTED, result="rejected")
                errors[printable(source)] = str(exc)
                if source in known:
                    keep.add(known[source])
                continue
            keep.add(result.id)
            if result.status == "created":
                created.append(result)
            else:
                unchanged += 1
        removed = sorted(set(known.values()) - keep)
        for doc_id in removed:
            self.delete(doc_id)
        return ReloadReport(created, unchanged, removed, errors)

    def _corpus_changed(self) -> None:
        if self._cache is not None:
            self._cache.bump_generation()

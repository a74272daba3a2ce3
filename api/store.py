"""ChromaDB behind a small interface: documents and their chunks.

Two collections. `<prefix>-chunks` holds one record per chunk, searched by similarity.
`<prefix>-documents` holds one record per document (full text, metadata, the mean of its
chunk vectors) and is the commit point: chunks are written first and the document record
last, so a document exists only once all its chunks do. Searches drop chunks whose
document record is missing, which hides a write cut off half-way; re-ingesting the same
content overwrites such leftovers (chunk ids derive from the content).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import chromadb
import httpx
import numpy as np
import structlog
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.config import Settings as ChromaSettings

from api.config import Settings
from api.embeddings import Vectors

log = structlog.get_logger(__name__)

Metadata = dict[str, str | int | float | bool]
USER_PREFIX = "meta_"
# How long a readiness probe or a scrape waits for the store before answering without it.
PROBE_SECONDS = 2.0
T = TypeVar("T")


def _kind(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timed out"
    if isinstance(exc, httpx.TransportError | ConnectionError):
        return "unreachable"
    return f"error ({type(exc).__name__})"


class StoreUnavailable(RuntimeError):
    """The vector store cannot be reached or refused the operation."""


class EmbeddedStoreBusy(RuntimeError):
    pass


class EmbeddingModelMismatch(RuntimeError):
    """The collections hold vectors from another model; mixing them would ruin retrieval."""


@dataclass(frozen=True)
class Hit:
    doc_id: str
    source: str
    title: str
    chunk: int
    content: str
    score: float


@dataclass(frozen=True)
class StoredDocument:
    id: str
    source: str
    title: str
    ingested_at: str
    origin: str
    chunks: int
    chars: int
    metadata: dict[str, Any]
    text: str | None = None

    def as_metadata(self) -> Metadata:
        meta: Metadata = {
            "source": self.source,
            "title": self.title,
            "ingested_at": self.ingested_at,
            "origin": self.origin,
            "chunks": self.chunks,
            "chars": self.chars,
        }
        meta.update({USER_PREFIX + k: v for k, v in self.metadata.items()})
        return meta

    @classmethod
    def from_record(cls, doc_id: str, meta: Any, text: str | None = None) -> StoredDocument:
        meta = dict(meta or {})
        user = {k[len(USER_PREFIX) :]: v for k, v in meta.items() if k.startswith(USER_PREFIX)}
        return cls(
            id=doc_id,
            source=str(meta.get("source", "")),
            title=str(meta.get("title", "")),
            ingested_at=str(meta.get("ingested_at", "")),
            origin=str(meta.get("origin", "")),
            chunks=int(meta.get("chunks", 0)),
            chars=int(meta.get("chars", 0)),
            metadata=user,
            text=text,
        )


def _bound_calls(client: ClientAPI, seconds: float) -> None:
    """chromadb's HTTP client waits forever (its httpx client has no timeout, and no
    setting gives it one): a Chroma that stops answering would hold every thread that
    calls it. Its session is private, so a chromadb that moves it fails here, loudly."""
    session = getattr(getattr(client, "_server", None), "_session", None)
    if not isinstance(session, httpx.Client):
        raise RuntimeError("cannot bound chromadb's HTTP calls: its client has changed")
    session.timeout = httpx.Timeout(seconds)


MAX_PROBES = 4  # probe threads still waiting on the store, at most, per process
_probes = threading.BoundedSemaphore(MAX_PROBES)


async def probe(call: Callable[[], T]) -> T:
    """`call` (a store call) in a thread of its own, given up after PROBE_SECONDS: a probe
    or a scrape answers without the store rather than waiting on it. The thread itself
    ends by CHROMA_TIMEOUT_SECONDS; while MAX_PROBES are still waiting, the next probe
    answers at once instead of adding one more."""
    if not _probes.acquire(blocking=False):
        raise StoreUnavailable("vector store: earlier probes still have no answer")
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if answered.done():  # given up on
            return
        if error is not None:
            answered.set_exception(error)
        else:
            answered.set_result(cast(T, result))

    def run() -> None:
        result, error = None, None
        try:
            result = call()
        except Exception as exc:  # handed to the waiting probe
            error = exc
        finally:
            _probes.release()
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="store-probe", daemon=True).start()
    try:
        return await asyncio.wait_for(answered, PROBE_SECONDS)  # cancelled when given up
    except TimeoutError:
        raise StoreUnavailable(f"vector store: no answer within {PROBE_SECONDS:g} s") from None


def _committed(docs: Collection, doc_id: str) -> bool:
    """Whether the document record, the commit point of a write, exists."""
    return bool(docs.get(ids=[doc_id], include=[])["ids"])


def _lock_data_dir(data_dir: Path, sibling_wait: float = 60.0) -> int:
    """Chroma's embedded store is not safe across processes (chroma-core/chroma#961, #3792):
    take an exclusive lock so a second process fails loudly instead of corrupting it.

    One holder is waited for: a sibling (a process with the same parent), for up to
    `sibling_wait` seconds. That is the worker gunicorn is replacing (HUP, a reload): the
    new one starts before the old one has finished its requests, and failing at once would
    make gunicorn halt the whole server."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "chroma.lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + sibling_wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if _is_sibling(holder) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            os.close(fd)
            raise EmbeddedStoreBusy(
                f"the embedded Chroma store in {data_dir} is in use by pid "
                f"{holder or 'of another process'}. The embedded store serves one process "
                "only: stop that process, use its HTTP API, or run a Chroma server and set "
                "CHROMA_HOST (required for more than one worker)."
            ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _is_sibling(pid: str) -> bool:
    """Another process with this one's parent."""
    try:
        other = int(pid)
        stat = Path(f"/proc/{other}/stat").read_text()
    except (ValueError, OSError):
        return False
    return other != os.getpid() and int(stat.rsplit(")", 1)[1].split()[1]) == os.getppid()


class VectorStore:
    def __init__(self, settings: Settings, embedding_model: str) -> None:
        self._embedding_model = embedding_model
        self._settings = settings
        self._prefix = settings.chroma_collection_prefix
        self._lock_fd: int | None = None
        self._client: ClientAPI | None = None
        self._collections: tuple[Collection, Collection] | None = None
        self._guard = threading.Lock()
        if settings.embedded_store:
            self._lock_fd = _lock_data_dir(settings.data_dir)

    @property
    def location(self) -> str:
        s = self._settings
        return (
            f"{s.data_dir / 'chroma'} (embedded)"
            if s.embedded_store
            else f"http://{s.chroma_host}:{s.chroma_port}"
        )

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- connection
    def _connect(self) -> tuple[Collection, Collection]:
        with self._guard:
            if self._collections is None:
                s = self._settings
                chroma_settings = ChromaSettings(anonymized_telemetry=False)
                if self._client is None:
                    if s.embedded_store:
                        self._client = chromadb.PersistentClient(
                            path=str(s.data_dir / "chroma"), settings=chroma_settings
                        )
                    else:
                        assert s.chroma_host is not None
                        # The client's constructor calls the server before its calls can be
                        # bounded: a server that does not answer this, within the bound,
                        # is not given the chance to hold it (and this lock) forever.
                        httpx.get(
                            f"http://{s.chroma_host}:{s.chroma_port}/api/v2/heartbeat",
                            timeout=s.chroma_timeout_seconds,
                        ).raise_for_status()
                        self._client = chromadb.HttpClient(
                            host=s.chroma_host, port=s.chroma_port, settings=chroma_settings
                        )
                        _bound_calls(self._client, s.chroma_timeout_seconds)
                # We always pass vectors in: no embedding function, so Chroma never
                # downloads its default model.
                cosine: Any = {"hnsw": {"space": "cosine"}}
                stamp = {"embedding_model": self._embedding_model}
                collections = tuple(
                    self._client.get_or_create_collection(
                        f"{self._prefix}-{kind}",
                        embedding_function=None,
                        configuration=cosine,
                        metadata=stamp,
                    )
                    for kind in ("chunks", "documents")
                )
                for collection in collections:
                    found = (collection.metadata or {}).get("embedding_model")
                    if found != self._embedding_model:
                        raise EmbeddingModelMismatch(
                            f"collection {collection.name} holds {found} vectors but this "
                            f"process embeds with {self._embedding_model}: set EMBED_PRECISION "
                            "to match, or use a new CHROMA_COLLECTION_PREFIX and re-ingest"
                        )
                self._collections = (collections[0], collections[1])
            return self._collections

    @contextmanager
    def _call(self, what: str) -> Iterator[tuple[Collection, Collection]]:
        try:
            yield self._connect()
        except (StoreUnavailable, EmbeddingModelMismatch):
            raise
        except Exception as exc:
            # A restarted server may have new collection ids: find them again on the next
            # call. The client stays: its calls are bounded, a new one's first are not.
            with self._guard:
                self._collections = None
            # The client hears what kind of failure; the cause's own text (addresses, the
            # server's messages) goes to the log.
            log.warning("vector store call failed", call=what, error=str(exc) or repr(exc))
            raise StoreUnavailable(f"vector store {what} failed: {_kind(exc)}") from exc

    def heartbeat(self) -> None:
        with self._call("heartbeat"):
            assert self._client is not None
            self._client.heartbeat()

    # --- reads
    def count_documents(self) -> int:
        with self._call("count") as (_, docs):
            return docs.count()

    def count_chunks(self) -> int:
        with self._call("count") as (chunks, _):
            return chunks.count()

    def get_document(self, doc_id: str, with_text: bool = True) -> StoredDocument | None:
        with self._call("get") as (_, docs):
            got = docs.get(
                ids=[doc_id], include=["metadatas", "documents"] if with_text else ["metadatas"]
            )
        if not got["ids"]:
            return None
        text = got["documents"][0] if got["documents"] else None
        return StoredDocument.from_record(doc_id, (got["metadatas"] or [{}])[0], text)

    def list_documents(self, limit: int, offset: int) -> tuple[list[StoredDocument], int]:
        with self._call("list") as (_, docs):
            total = docs.count()
            got = docs.get(limit=limit, offset=offset, include=["metadatas"])
        metas = got["metadatas"] or [{}] * len(got["ids"])
        return [
            StoredDocument.from_record(i, m) for i, m in zip(got["ids"], metas, strict=True)
        ], total

    def documents_from(self, origin: str) -> dict[str, str]:
        """source -> id of every document ingested from `origin`."""
        with self._call("list") as (_, docs):
            got = docs.get(where={"origin": origin}, include=["metadatas"])
        return {
            str((m or {}).get("source")): i
            for i, m in zip(got["ids"], got["metadatas"] or [], strict=True)
        }

    def search(self, embedding: Vectors, k: int) -> list[Hit]:
        with self._call("query") as (chunks, docs):
            got = chunks.query(
                query_embeddings=[embedding.tolist()],
                n_results=k,
                include=["metadatas", "documents", "distances"],
            )
            metas = (got["metadatas"] or [[]])[0]
            texts = (got["documents"] or [[]])[0]
            dists = (got["distances"] or [[]])[0]
            doc_ids = {str(m["doc_id"]) for m in metas}
            committed = set(docs.get(ids=sorted(doc_ids), include=[])["ids"]) if doc_ids else set()
        return [
            Hit(
                doc_id=str(m["doc_id"]),
                source=str(m["source"]),
                title=str(m["title"]),
                chunk=cast(int, m["chunk"]),
                content=t,
                score=round(1.0 - float(d), 6),
            )
            for m, t, d in zip(metas, texts, dists, strict=True)
            if m["doc_id"] in committed
        ]

    # --- writes
    def write_document(
        self, doc: StoredDocument, text: str, chunk_texts: Sequence[str], vectors: Vectors
    ) -> None:
        ids = [f"{doc.id}:{i}" for i in range(len(chunk_texts))]
        metas: list[Metadata] = [
            {"doc_id": doc.id, "chunk": i, "source": doc.source, "title": doc.title}
            for i in range(len(chunk_texts))
        ]
        centroid = vectors.mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        with self._call("write") as (chunks, docs):
            assert self._client is not None
            if _committed(docs, doc.id):
                return  # another writer committed this same content meanwhile
            batch = self._client.get_max_batch_size()
            # Chunk ids derive from the content, so concurrent writers of one document
            # upsert identical records. Leftovers of an interrupted write cut with other
            # chunk settings may run past our last chunk: those go.
            beyond: Any = {"$and": [{"doc_id": doc.id}, {"chunk": {"$gte": len(ids)}}]}
            chunks.delete(where=beyond)

            def put_chunks() -> None:
                for start in range(0, len(ids), batch):
                    end = start + batch
                    chunks.upsert(
                        ids=ids[start:end],
                        embeddings=vectors[start:end].tolist(),
                        documents=list(chunk_texts[start:end]),
                        metadatas=list(metas[start:end]),
                    )

            try:
                put_chunks()
                docs.upsert(
                    ids=[doc.id],
                    embeddings=[centroid.tolist()],
                    documents=[text],
                    metadatas=[doc.as_metadata()],
                )
                # A delete of this same content (another worker, another replica) may have
                # removed our chunks between their write and our commit: a document must
                # never be committed without them.
                if len(chunks.get(ids=ids, include=[])["ids"]) < len(ids):
                    put_chunks()
                    if not _committed(docs, doc.id):  # and the delete has since won
                        chunks.delete(ids=ids)
            except Exception:
                # Roll back, unless a concurrent writer has committed the same document.
                if not _committed(docs, doc.id):
                    chunks.delete(ids=ids)
                raise

    def delete_document(self, doc_id: str) -> bool:
        with self._call("delete") as (chunks, docs):
            if not _committed(docs, doc_id):
                return False
            # Document record first: from here on its chunks are invisible to searches.
            docs.delete(ids=[doc_id])
            chunks.delete(where={"doc_id": doc_id})
            if _committed(docs, doc_id):
                # The same content was written again meanwhile, and its chunks may have
                # gone with the delete: the delete wins, and takes whatever chunks the
                # writer put back with it (chunks without a record would crowd searches).
                docs.delete(ids=[doc_id])
                chunks.delete(where={"doc_id": doc_id})
            return True

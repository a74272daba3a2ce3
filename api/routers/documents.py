from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import ServicesDep, json_body
from api.ingest import NewDocument
from api.loaders import load_file, parsed_in_child
from api.schemas import (
    INVALID_BODY,
    DeleteResponse,
    DocumentDetail,
    DocumentOut,
    DocumentPage,
    IngestedDocument,
    IngestRequest,
    IngestResponse,
    ReloadResponse,
)
from api.services import Services

router = APIRouter(prefix="/documents", tags=["documents"])

_INGEST_BODIES = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": IngestRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
        },
    }
}


async def _from_json(request: Request, services: Services) -> list[NewDocument]:
    body = await json_body(request, IngestRequest)
    limits = services.settings
    if len(body.documents) > limits.max_documents_per_request:
        raise HTTPException(
            422, f"at most {limits.max_documents_per_request} documents per request"
        )
    for i, doc in enumerate(body.documents):
        if len(doc.text) > limits.max_document_chars:
            raise HTTPException(
                422, f"document {i} is longer than {limits.max_document_chars} characters"
            )
    return [NewDocument(d.text, d.source, "api", d.title, dict(d.metadata)) for d in body.documents]


async def _from_upload(request: Request, services: Services) -> list[NewDocument]:
    limits = services.settings
    form = await request.form(max_files=limits.max_documents_per_request, max_fields=16)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise HTTPException(422, "multipart upload needs one or more parts named 'files'")
    documents = []
    for upload in files:
        data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(
                413, f"{upload.filename}: larger than {limits.max_upload_bytes} bytes"
            )
        name = upload.filename or "upload"
        # PDF and HTML wait for a parser without holding one of the pool's threads, which
        # queries and probes need (a queue of slow files would otherwise take them all).
        loaded = await anyio.to_thread.run_sync(
            partial(
                load_file, name, data, limits.max_document_chars, limits.extract_timeout_seconds
            ),
            limiter=services.parsers if parsed_in_child(name) else None,
        )
        documents.append(NewDocument(loaded.text, loaded.name, "upload", loaded.title))
    return documents


@router.post(
    "", response_model=IngestResponse, openapi_extra=_INGEST_BODIES, responses=INVALID_BODY
)
async def ingest(request: Request, services: ServicesDep) -> IngestResponse:
    """Ingest JSON documents or uploaded files (.txt .md .pdf .html). Every document is
    checked before the first write; identical content is stored once."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        documents = await _from_json(request, services)
    elif kind == "multipart/form-data":
        documents = await _from_upload(request, services)
    else:
        raise HTTPException(415, "send application/json or multipart/form-data")
    results = await run_in_threadpool(services.ingestor.ingest, documents)
    return IngestResponse(documents=[IngestedDocument.model_validate(r) for r in results])


@router.get("", response_model=DocumentPage)
async def list_documents(
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> DocumentPage:
    docs, total = await run_in_threadpool(services.store.list_documents, limit, offset)
    return DocumentPage(
        documents=[DocumentOut.model_validate(d) for d in docs],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.post("/reload", response_model=ReloadResponse)
async def reload(services: ServicesDep) -> ReloadResponse:
    """Make the store match DOCUMENTS_DIR: ingest new and changed files, drop removed ones."""
    report = await run_in_threadpool(services.ingestor.reload, services.settings.documents_dir)
    return ReloadResponse(
        created=[IngestedDocument.model_validate(r) for r in report.created],
        unchanged=report.unchanged,
        removed=report.removed,
        errors=report.errors,
    )


@router.get("/{doc_id}", response_model=DocumentDetail, responses={404: {}})
async def get_document(doc_id: str, services: ServicesDep) -> DocumentDetail:
    doc = await run_in_threadpool(services.store.get_document, doc_id)
    if doc is None:
        raise HTTPException(404, f"no document {doc_id}")
    return DocumentDetail.model_validate(doc)


@router.delete("/{doc_id}", response_model=DeleteResponse, responses={404: {}})
async def delete_document(doc_id: str, services: ServicesDep) -> DeleteResponse:
    """Remove a document and every one of its chunks."""
    if not await run_in_threadpool(services.ingestor.delete, doc_id):
        raise HTTPException(404, f"no document {doc_id}")
    return DeleteResponse(id=doc_id, deleted=True)

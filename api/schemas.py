"""Request and response bodies of the public HTTP API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

MetadataKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]


def _not_an_int(value: object) -> object:
    # Without this, an integer too big for int64 would slip through as a float.
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError("integers must fit in 64 bits")
    return value


# Chroma stores 64-bit integers and finite floats; anything else would be silently changed.
MetadataValue = (
    Annotated[str, StringConstraints(max_length=1024)]
    | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_an_int)]
    | bool
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(_Strict):
    text: str = Field(min_length=1)
    source: str = Field("api", min_length=1, max_length=512)
    title: str | None = Field(None, max_length=512)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=32)


class IngestRequest(_Strict):
    documents: list[DocumentIn] = Field(min_length=1)


class _FromAttributes(BaseModel):
    """Built straight from the service's dataclasses."""

    model_config = ConfigDict(from_attributes=True)


class IngestedDocument(_FromAttributes):
    id: str
    source: str
    title: str
    chunks: int
    status: Literal["created", "unchanged"]


class IngestResponse(BaseModel):
    documents: list[IngestedDocument]


class DocumentOut(_FromAttributes):
    id: str
    source: str
    title: str
    ingested_at: str
    origin: str
    chunks: int
    chars: int
    metadata: dict[str, str | int | float | bool]


class DocumentDetail(DocumentOut):
    text: str | None


class DocumentPage(BaseModel):
    documents: list[DocumentOut]
    total: int
    limit: int
    offset: int


class DeleteResponse(BaseModel):
    id: str
    deleted: bool


class ReloadResponse(BaseModel):
    created: list[IngestedDocument]
    unchanged: int
    removed: list[str]
    errors: dict[str, str]


class QueryRequest(_Strict):
    question: str = Field(min_length=1)
    max_sources: int = Field(3, ge=1, le=20)
    temperature: float = Field(0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    stream: bool = False


class Source(BaseModel):
    document: str = Field(description="the source the chunk came from (file name or given source)")
    content: str
    score: float = Field(description="cosine similarity of chunk and question, -1..1")
    document_id: str
    title: str
    chunk: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class QueryResponse(BaseModel):
    answer: str
    sources: list[Source]
    processing_time: float = Field(description="seconds spent on the request")
    cached: bool
    generator: Literal["openai", "extractive"] = Field(description="which generator answered")
    usage: Usage | None = Field(None, description="LLM tokens, when an LLM answered")


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class DependencyState(BaseModel):
    status: Literal["ok", "degraded", "down", "disabled"]
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "unavailable"]
    dependencies: dict[str, DependencyState]


class InvalidField(BaseModel):
    type: str = Field(description="pydantic's error type, e.g. missing, string_too_short")
    loc: list[str | int] = Field(description='where: ["body", field, ...]')
    msg: str


class InvalidBody(BaseModel):
    """422: the request body does not validate (what `json_body` and FastAPI return)."""

    detail: list[InvalidField] | str


INVALID_BODY: dict[int | str, dict[str, object]] = {
    422: {"model": InvalidBody, "description": "the body is not valid JSON or not valid"}
}

"""The one settings object: every knob is an environment variable (see the README table)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The tokenizer adds [CLS] and [SEP] to every input; the model sees at most 256 tokens.
MODEL_MAX_TOKENS = 256
SPECIAL_TOKENS = 2
MIN_PROMPT_TOKENS = 256  # instructions (~60), a question and at least one source


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # --- serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    web_concurrency: int = Field(1, ge=1, description="gunicorn worker processes")
    timeout_seconds: int = Field(120, ge=1, description="gunicorn worker timeout")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "console"] = "json"
    access_log: bool = True
    metrics_enabled: bool = True

    # --- storage
    data_dir: Path = Path("data")
    documents_dir: Path = Path("documents")
    ingest_on_start: bool = True
    chroma_host: str | None = None
    chroma_port: int = Field(8000, ge=1, le=65535)
    chroma_timeout_seconds: float = Field(10.0, gt=0, description="per call to a Chroma server")
    chroma_collection_prefix: str = Field("rag", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,40}$")

    # --- cache
    redis_url: str | None = None
    cache_ttl_seconds: int = Field(3600, ge=1)
    redis_timeout_seconds: float = Field(0.25, gt=0)
    redis_retry_seconds: float = Field(2.0, gt=0)

    # --- embeddings
    model_dir: Path = Path("models")
    embed_precision: Literal["int8", "fp32"] = "int8"
    embed_threads: int = Field(1, ge=1)
    embed_batch_size: int = Field(1, ge=1, le=512)
    chunk_tokens: int = Field(200, ge=16, le=MODEL_MAX_TOKENS - SPECIAL_TOKENS)
    chunk_overlap_tokens: int = Field(40, ge=0)

    # --- generation
    generator: Literal["openai", "extractive"] = "openai"
    answer_sentences: int = Field(3, ge=1, le=10)
    llm_base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. .../v1")
    llm_model: str = "smollm2-135m-instruct"
    llm_api_key: str | None = None
    llm_timeout_seconds: float = Field(60.0, gt=0, description="per read, while streaming")
    llm_connect_timeout_seconds: float = Field(2.0, gt=0)
    llm_retries: int = Field(2, ge=0, le=10, description="on connect errors only")
    llm_max_tokens: int = Field(256, ge=1)
    llm_context_tokens: int = Field(2048, ge=256, description="the model's context window")
    llm_fallback: Literal["none", "extractive"] = "none"
    # The served model's GGUF, for exact prompt token counts; unset: estimated from length.
    llm_gguf: Path | None = None
    # The local model `serve` starts when GENERATOR=openai and LLM_BASE_URL is unset.
    llm_port: int = Field(8090, ge=1, le=65535)
    llm_threads: int = Field(2, ge=1)

    # --- input bounds
    max_question_chars: int = Field(2000, ge=1)
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_document_chars: int = Field(2_000_000, ge=1)
    # PDF_TIMEOUT_SECONDS is its first name, from when only PDFs were parsed in a child.
    extract_timeout_seconds: float = Field(
        20.0,
        gt=0,
        validation_alias=AliasChoices("extract_timeout_seconds", "pdf_timeout_seconds"),
        description="per PDF or HTML text extraction",
    )
    max_documents_per_request: int = Field(100, ge=1)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        level = value.strip().lower()
        return "warning" if level == "warn" else level  # the stdlib's alias

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("CHUNK_OVERLAP_TOKENS must be smaller than CHUNK_TOKENS")
        # The instructions, a question and a source need room beside the answer: without
        # it every question would be refused as too long.
        if self.llm_context_tokens - self.llm_max_tokens < MIN_PROMPT_TOKENS:
            raise ValueError(
                f"LLM_MAX_TOKENS leaves less than {MIN_PROMPT_TOKENS} of LLM_CONTEXT_TOKENS "
                "for the prompt"
            )
        return self

    @property
    def embedded_store(self) -> bool:
        return not self.chroma_host


@lru_cache
def get_settings() -> Settings:
    return Settings()

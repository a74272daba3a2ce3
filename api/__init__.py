"""RAG API: ingest documents, retrieve by meaning, answer with cited sources."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rag-api")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

"""RAG API: ingest documents, retrieve by meaning, answer with cited sources."""

from importlib.metadata import PackageNotFoundError, version

from api.processes import service_environment

# Every process of the service (the CLI, gunicorn and its workers, the span relay, the
# stack and load-test commands) imports this package first, before any library that reads
# these settings loads; the children they start inherit them.
service_environment()

try:
    __version__ = version("rag-api")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

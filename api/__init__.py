"""RAG API: ingest documents, retrieve by meaning, answer with cited sources."""

import os
from importlib.metadata import PackageNotFoundError, version

# onnxruntime (1.2x on Linux too) sends usage telemetry to mobile.events.data.microsoft.com
# about 10 s after its first session, and every few seconds after. This service talks to
# no host it was not configured for. ORT_DISABLE_TELEMETRY is read when onnxruntime loads,
# and every process of the service (and every child it starts) imports this package
# first. An operator may still set it to 0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

try:
    __version__ = version("rag-api")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

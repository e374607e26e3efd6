"""A compiled model loaded from its artifact: the VM, the weights and the paged KV cache.

Imports only the TVM runtime, numpy and relaxlm's artifact format - never compiler code.
"""

import os
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from relaxlm.artifacts import Manifest, verify, weight_index
from relaxlm.artifacts.safetensors_io import read
from relaxlm.errors import RelaxlmError

_kv = {
    name: tvm.get_global_func(f"vm.builtin.{name}")
    for name in (
        "kv_state_add_sequence",
        "kv_state_remove_sequence",
        "kv_state_begin_forward",
        "kv_state_end_forward",
        "attention_kv_cache_get_num_available_pages",
    )
}


class CompiledModel:
    """Runs the artifact's entry functions over sequences held in one paged KV cache."""

    def __init__(
        self,
        folder: str | os.PathLike,
        device: str = "cpu",
        max_batch_size: int = 8,
        max_total_tokens: int | None = None,
    ):
        self.folder = Path(folder)
        self.manifest = manifest = Manifest.read(self.folder)
        verify(self.folder, manifest)
        kind = device.split(":")[0]
        if kind not in manifest.targets:
            raise RelaxlmError(
                f"{folder}: artifact has no library for device {device!r} "
                f"(built for: {', '.join(manifest.targets)}); compile it with --target {kind}"
            )
        self.device = tvm.runtime.device(device)
        library = tvm.runtime.load_module(str(self.folder / manifest.targets[kind]["library"]))
        self.vm = VirtualMachine(library, self.device)
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]
        index = weight_index(self.folder, manifest)
        self.params = [
            tvm.runtime.tensor(read(index[p["name"]]), self.device) for p in manifest.params
        ]
        self.context_window = manifest.context_window
        self.prefill_chunk = manifest.prefill_chunk_size
        total = max_total_tokens or self.context_window * max_batch_size
        page = manifest.kv_cache["page_size"]
        self.kv_cache = self.vm["create_paged_kv_cache"](
            ShapeTuple([max_batch_size]),
            ShapeTuple([total]),
            ShapeTuple([self.prefill_chunk]),
            ShapeTuple([page]),
            ShapeTuple([0]),  # no sliding window
        )
        self._next_seq_id = 0

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def add_sequence(self) -> int:
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        _kv["kv_state_add_sequence"](self.kv_cache, seq_id)
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        _kv["kv_state_remove_sequence"](self.kv_cache, seq_id)

    def free_pages(self) -> int:
        return int(_kv["attention_kv_cache_get_num_available_pages"](self.kv_cache))

    def prefill(self, seq_id: int, tokens: list[int]) -> np.ndarray:
        """Append `tokens` to the sequence in chunks; logits after the last one, [vocab]."""
        if not tokens:
            raise RelaxlmError("cannot prefill an empty prompt")
        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk]
            ids = tvm.runtime.tensor(np.array([chunk], dtype="int32"), self.device)
            last = tvm.runtime.tensor(np.array([len(chunk) - 1], dtype="int32"), self.device)
            _kv["kv_state_begin_forward"](
                self.kv_cache, ShapeTuple([seq_id]), ShapeTuple([len(chunk)])
            )
            logits = self._prefill(ids, last, self.kv_cache, self.params)
            _kv["kv_state_end_forward"](self.kv_cache)
        return logits.numpy()[0, 0]

    def decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each sequence; logits [len(seq_ids), vocab]."""
        ids = tvm.runtime.tensor(np.array(tokens, dtype="int32").reshape(-1, 1), self.device)
        _kv["kv_state_begin_forward"](
            self.kv_cache, ShapeTuple(seq_ids), ShapeTuple([1] * len(seq_ids))
        )
        logits = self._decode(ids, self.kv_cache, self.params)
        _kv["kv_state_end_forward"](self.kv_cache)
        return logits.numpy()[:, 0]

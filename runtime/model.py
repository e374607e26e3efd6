"""A compiled model loaded from its artifact: the VM, the weights and the paged KV cache.

Imports only the TVM runtime, numpy and relaxlm's artifact format - never compiler code.
"""

import os

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.loader import load_artifact

_kv = {
    name: tvm.get_global_func(f"vm.builtin.{name}")
    for name in (
        "kv_state_add_sequence",
        "kv_state_remove_sequence",
        "kv_state_fork_sequence",
        "kv_state_popn",
        "kv_state_begin_forward",
        "kv_state_end_forward",
        "kv_state_clear",
        "attention_kv_cache_get_num_available_pages",
    )
}


DEFAULT_MAX_BATCH_SIZE = 8


class CompiledModel:
    """Runs the artifact's entry functions over sequences held in one paged KV cache.

    The caller names the sequences (integer ids) and decides when to add, fork and remove them;
    `prefill` and `decode` each run one forward over several sequences.

    max_batch_size: sequences in one forward; by default 8, or the artifact's prefill chunk
        where that is smaller (sliding windows under 8 tokens cap it).
    max_total_tokens: tokens the KV cache holds, all sequences together (rounded up to pages).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        device: str = "cpu",
        max_batch_size: int | None = None,
        max_total_tokens: int | None = None,
        threads: int | None = None,
    ):
        loaded = load_artifact(folder, device, "generate", threads)
        self.threads, self.folder, self.manifest = loaded.threads, loaded.folder, loaded.manifest
        self.device, self.vm, self.params = loaded.device, loaded.vm, loaded.params
        manifest = self.manifest
        self.context_window = manifest.context_window
        self.prefill_chunk = manifest.prefill_chunk_size
        # The cache's scratch buffers hold prefill_chunk tokens per forward; a decode step of
        # max_batch_size sequences is one token each.
        if max_batch_size is None:
            max_batch_size = min(DEFAULT_MAX_BATCH_SIZE, self.prefill_chunk)
        if not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= self.prefill_chunk:
            raise RelaxlmError(
                f"max_batch_size={max_batch_size!r} is invalid; set it to an integer in "
                f"[1, {self.prefill_chunk}] (the artifact's prefill chunk size)"
            )
        total = max_total_tokens or self.context_window * max_batch_size
        if not isinstance(total, int) or total < 1:
            raise RelaxlmError(
                f"kv_cache_tokens={max_total_tokens!r} is invalid; set it to an integer >= 1"
            )
        self.max_batch_size = max_batch_size
        self.page_size = manifest.kv_cache["page_size"]
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]
        self.kv_cache = self.vm["create_paged_kv_cache"](
            ShapeTuple([max_batch_size]),
            ShapeTuple([total]),
            ShapeTuple([self.prefill_chunk]),
            ShapeTuple([self.page_size]),
            ShapeTuple([0]),  # no sliding window
        )
        self.num_pages = self.free_pages()  # TVM rounds up and keeps a spare page

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    # -- sequences ----------------------------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        _kv["kv_state_add_sequence"](self.kv_cache, seq_id)

    def fork_sequence(self, parent: int, child: int, pos: int) -> None:
        """New sequence `child` holding the first `pos` tokens of `parent`; full pages are
        shared, a page cut at `pos` is copied."""
        _kv["kv_state_fork_sequence"](self.kv_cache, parent, child, pos)

    def remove_sequence(self, seq_id: int) -> None:
        _kv["kv_state_remove_sequence"](self.kv_cache, seq_id)

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the last n tokens of the sequence."""
        _kv["kv_state_popn"](self.kv_cache, seq_id, n)

    def clear(self) -> None:
        """Remove every sequence."""
        _kv["kv_state_clear"](self.kv_cache)

    def free_pages(self) -> int:
        return int(_kv["attention_kv_cache_get_num_available_pages"](self.kv_cache))

    # -- forwards -----------------------------------------------------------------------------

    def prefill(
        self, seq_ids: list[int], chunks: list[list[int]], every_token: bool = False
    ) -> np.ndarray:
        """Append chunks[i] to sequence seq_ids[i] in one forward; logits after each chunk's last
        token, [len(seq_ids), vocab] (after every token, [total tokens, vocab], with
        every_token). At most `prefill_chunk` tokens in all."""
        lengths = [len(c) for c in chunks]
        if not all(lengths) or sum(lengths) > self.prefill_chunk:
            raise RelaxlmError(
                f"prefill chunks of {lengths} tokens: each needs >= 1 token and "
                f"{self.prefill_chunk} is the most in one forward; split them"
            )
        flat = np.fromiter((t for c in chunks for t in c), dtype="int32", count=sum(lengths))
        ids = tvm.runtime.tensor(flat.reshape(1, -1), self.device)  # [1, total_tokens]
        last = np.cumsum(lengths, dtype="int32") - 1  # [num_seqs]
        if every_token:
            last = np.arange(sum(lengths), dtype="int32")  # [total_tokens]
        positions = tvm.runtime.tensor(last, self.device)
        _kv["kv_state_begin_forward"](self.kv_cache, ShapeTuple(seq_ids), ShapeTuple(lengths))
        logits = self._prefill(ids, positions, self.kv_cache, self.params)
        _kv["kv_state_end_forward"](self.kv_cache)
        return logits.numpy()[0]  # [1, num_seqs, vocab] -> [num_seqs, vocab]

    def decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each sequence; logits [len(seq_ids), vocab]."""
        ids = tvm.runtime.tensor(np.array(tokens, dtype="int32").reshape(-1, 1), self.device)
        _kv["kv_state_begin_forward"](
            self.kv_cache, ShapeTuple(seq_ids), ShapeTuple([1] * len(seq_ids))
        )
        logits = self._decode(ids, self.kv_cache, self.params)
        _kv["kv_state_end_forward"](self.kv_cache)
        return logits.numpy()[:, 0]  # [batch, 1, vocab] -> [batch, vocab]

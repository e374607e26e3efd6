"""A compiled model loaded from its artifact: the VM, the weights and the paged KV cache.

A model split across devices (a device map) runs as pipeline stages, each with its VM, its
weights and a paged KV cache of its own layers on its device; every KV-cache operation applies
to all the caches alike, so they hold the same sequences in the same pages, and a forward hands
the hidden state from stage to stage. A model split into tensor-parallel shards is one stage
whose operations run on every shard of a Disco session (runtime/disco.py). Callers (the
engine) see one model either way.

Imports only the TVM runtime, numpy and relaxlm's artifact format - never compiler code.
"""

import os
import re
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from relaxlm.artifacts import Manifest, sampling
from relaxlm.artifacts.library_gemm import BATCHED_DECODE, BATCHED_DECODE_MIN
from relaxlm.errors import RelaxlmError
from relaxlm.runtime import gpu_sampling
from relaxlm.runtime.disco import ShardedStage
from relaxlm.runtime.gpu_sampling import DeviceRow
from relaxlm.runtime.loader import LoadedStage, load_artifact, use_threads
from relaxlm.runtime.sampler import Sample, Sampler, sample_batch

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
    kv_cache_memory: or the bytes its pages may take ("64MB", "1.5GiB" or an int): as many
        tokens as fit (the manifest's `kv_cache.bytes_per_token`, so a quantized cache holds more).
    sample_on_device: choose tokens with the artifact's sampling kernels on the logits where
        they are (runtime/gpu_sampling.py); None: on a GPU, when the artifact has them (a
        one-stage model), else numpy on the host (the faster there). True on a CPU runs the
        kernels' CPU build (tests of the kernel path).
    device_map: for an artifact split across devices, other device ordinals for its stages
        (the same layers and device kinds: `cuda:1:0-15,cuda:2:16-31`); `device` is unused.
    disco: for an artifact split into tensor-parallel shards, the Disco session that runs
        them: "threaded" (the default: one thread per shard) or "process" (one process each).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        device: str = "cpu",
        max_batch_size: int | None = None,
        max_total_tokens: int | None = None,
        threads: int | None = None,
        device_map: str | None = None,
        disco: str | None = None,
        kv_cache_memory: str | int | None = None,
        sample_on_device: bool | None = None,
    ):
        manifest = Manifest.read(folder)
        if manifest.tensor_parallel:
            if device_map is not None:
                raise RelaxlmError(
                    f"{folder} is split into tensor-parallel shards, so it takes no device map"
                )
            loaded = None
            self.threads, self.folder = use_threads(threads), Path(folder)
            self.manifest = manifest
        else:
            if disco is not None:
                raise RelaxlmError(
                    f"disco={disco!r} runs tensor-parallel artifacts, and {folder} is not one; "
                    "compile it with --tensor-parallel N, or drop disco"
                )
            loaded = load_artifact(folder, device, "generate", threads, device_map)
            self.threads, self.folder, self.manifest = loaded.threads, loaded.folder, manifest
            self.device, self.vm, self.params = loaded.device, loaded.vm, loaded.params
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
        self.kv_bytes_per_token = kv_bytes_per_token(manifest.kv_cache, manifest.dtype)
        if kv_cache_memory is not None:
            if max_total_tokens is not None:
                raise RelaxlmError(
                    "kv_cache_tokens and kv_cache_memory both size the KV cache; pass one"
                )
            max_total_tokens = _tokens_in(kv_cache_memory, self.kv_bytes_per_token)
        total = max_total_tokens or self.context_window * max_batch_size
        if not isinstance(total, int) or total < 1:
            raise RelaxlmError(
                f"kv_cache_tokens={max_total_tokens!r} is invalid; set it to an integer >= 1"
            )
        self.max_batch_size = max_batch_size
        self.page_size = manifest.kv_cache["page_size"]
        sizes = (max_batch_size, total, self.prefill_chunk, self.page_size)
        if loaded is None:  # one stage: every shard, in a Disco session
            sharded = ShardedStage(self.folder, manifest, disco or "threaded", sizes, device)
            self.stages = [sharded]
            self.device, self.vm, self.params = sharded.device, sharded.vm, sharded.params
        else:
            self.stages = [_Stage(stage, sizes) for stage in loaded.stages]
        self.kv_cache = self.stages[0].kv_cache  # the first stage's (a split model has several)
        self.num_pages = self.free_pages()  # TVM rounds up and keeps a spare page
        # Adapter slots (runtime/lora.py): each forward takes a slot id per token, 0 = none.
        self.lora_slots = manifest.lora_slots.get("slots", 0) if manifest.lora_slots else 0
        self.sample_on_device = self._device_sampling(sample_on_device)

    def _device_sampling(self, wanted: bool | None) -> bool:
        """Whether forwards leave their logits on the device for the sampling kernels."""
        # A split model's logits come from its last stage's VM, a sharded one's from a Disco
        # session: neither is wired to the kernels, so they sample on the host.
        has = (
            len(self.stages) == 1
            and isinstance(self.stages[0], _Stage)
            and all(self.vm.module.implements_function(f) for f in sampling.FUNCTIONS)
        )
        if wanted and not has:
            raise RelaxlmError(
                f"{self.folder} cannot sample on the device: it has no sampling functions (an "
                "artifact from before they were compiled in, or one split into stages or "
                "shards); recompile it, or drop sample_on_device"
            )
        if wanted is None:
            return has and self.device.dlpack_device_type() != tvm.cpu().dlpack_device_type()
        return bool(wanted)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    # -- sequences ----------------------------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        self._each_cache("kv_state_add_sequence", seq_id)

    def fork_sequence(self, parent: int, child: int, pos: int) -> None:
        """New sequence `child` holding the first `pos` tokens of `parent`; full pages are
        shared, a page cut at `pos` is copied."""
        self._each_cache("kv_state_fork_sequence", parent, child, pos)

    def remove_sequence(self, seq_id: int) -> None:
        self._each_cache("kv_state_remove_sequence", seq_id)

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the last n tokens of the sequence."""
        self._each_cache("kv_state_popn", seq_id, n)

    def clear(self) -> None:
        """Remove every sequence."""
        self._each_cache("kv_state_clear")

    def free_pages(self) -> int:
        # The caches change in lockstep, so they agree; the least is the safe answer anyway.
        op = "attention_kv_cache_get_num_available_pages"
        return min(int(stage.kv(op)) for stage in self.stages)

    def _each_cache(self, op: str, *args) -> None:
        for stage in self.stages:
            stage.kv(op, *args)

    # -- forwards -----------------------------------------------------------------------------

    def prefill(
        self,
        seq_ids: list[int],
        chunks: list[list[int]],
        every_token: bool = False,
        slots: list[int] | None = None,
        on_device: bool = False,
    ) -> np.ndarray | list[DeviceRow]:
        """Append chunks[i] to sequence seq_ids[i] in one forward; logits after each chunk's last
        token, [len(seq_ids), vocab] (after every token, [total tokens, vocab], with
        every_token). At most `prefill_chunk` tokens in all.

        slots: the LoRA slot each sequence computes with (0 or None: the base model alone).
        on_device: the logits stay on the device, a DeviceRow each (for `sample`).
        """
        lengths = [len(c) for c in chunks]
        if not all(lengths) or sum(lengths) > self.prefill_chunk:
            raise RelaxlmError(
                f"prefill chunks of {lengths} tokens: each needs >= 1 token and "
                f"{self.prefill_chunk} is the most in one forward; split them"
            )
        flat = np.fromiter((t for c in chunks for t in c), dtype="int32", count=sum(lengths))
        last = np.cumsum(lengths, dtype="int32") - 1  # [num_seqs]
        if every_token:
            last = np.arange(sum(lengths), dtype="int32")  # [total_tokens]
        extra = [last, *self._slot_ids(slots, lengths)]
        logits = self._forward("prefill", flat.reshape(1, -1), extra, seq_ids, lengths)
        if on_device:  # [1, num_seqs, vocab]: row i is sequence i's
            return [DeviceRow(logits, i) for i in range(len(last))]
        return logits.numpy()[0]  # [1, num_seqs, vocab] -> [num_seqs, vocab]

    def decode(
        self,
        seq_ids: list[int],
        tokens: list[int],
        slots: list[int] | None = None,
        on_device: bool = False,
    ) -> np.ndarray | list[DeviceRow]:
        """One token for each sequence; logits [len(seq_ids), vocab]. slots, on_device: as
        prefill's."""
        ids = np.array(tokens, dtype="int32").reshape(-1, 1)  # [batch, 1]
        ones = [1] * len(seq_ids)
        entry = "decode"
        batched = all(BATCHED_DECODE in stage.entries for stage in self.stages)  # CPU ones: none
        if len(seq_ids) >= BATCHED_DECODE_MIN and batched:
            entry = BATCHED_DECODE  # the weights read once for the batch (GEMMs)
        logits = self._forward(entry, ids, self._slot_ids(slots, ones), seq_ids, ones)
        if on_device:  # [batch, 1, vocab]: row i is sequence i's
            return [DeviceRow(logits, i) for i in range(len(seq_ids))]
        return logits.numpy()[:, 0]  # [batch, 1, vocab] -> [batch, vocab]

    def sample(self, rows: list[DeviceRow], samplers: list[Sampler]) -> list[Sample]:
        """One token per row, rows[i] chosen with samplers[i] (which records it), by the
        sampling kernels where every sampler is `covered`, else by numpy on a host copy."""
        if not all(gpu_sampling.covered(s) for s in samplers):
            # A grammar's mask or top logprobs: the whole batch on the host, one copy a forward.
            copies: dict[int, np.ndarray] = {}
            return sample_batch(np.stack([row.host(copies) for row in rows]), samplers)
        out: list[Sample | None] = [None] * len(rows)
        forwards: dict[int, list[int]] = {}  # a forward's logits -> positions of its rows
        for i, row in enumerate(rows):
            forwards.setdefault(id(row.logits), []).append(i)
        for positions in forwards.values():
            logits = rows[positions[0]].logits
            picked = [rows[i].index for i in positions]
            chosen = gpu_sampling.sample_on_device(
                self.vm, self.device, logits, picked, [samplers[i] for i in positions]
            )
            for i, sample in zip(positions, chosen, strict=True):
                out[i] = sample
        return out

    def _slot_ids(self, slots: list[int] | None, lengths: list[int]) -> list:
        """The entries' `lora_slots` input: each sequence's slot repeated over its tokens
        (none for an artifact without slots)."""
        if not self.lora_slots:
            if slots and any(slots):
                raise RelaxlmError(
                    f"{self.folder} has no LoRA slots; compile it with lora_slots=K "
                    "(--lora-slots K) to serve adapters unmerged"
                )
            return []
        per_token = np.repeat(np.asarray(slots or [0] * len(lengths), "int32"), lengths)
        if per_token.size and not 0 <= per_token.min() <= per_token.max() <= self.lora_slots:
            raise RelaxlmError(f"LoRA slots {slots} lie outside [0, {self.lora_slots}]")
        return [per_token]

    def _forward(self, entry: str, ids: np.ndarray, last_args: list, seq_ids, lengths):
        """Run `entry` through every stage: token ids in, the hidden state handed on from
        device to device, `last_args` (the logit positions, host arrays) to the last stage;
        its logits, on the device."""
        for stage in self.stages:
            stage.kv("kv_state_begin_forward", ShapeTuple(seq_ids), ShapeTuple(lengths))
        x = ids
        for stage in self.stages:
            x = stage.forward(entry, x, last_args if stage is self.stages[-1] else [])
        for stage in self.stages:
            stage.kv("kv_state_end_forward")
        return x


class _Stage:
    """A loaded stage (or the whole model) with its entry functions and its paged KV cache."""

    def __init__(self, loaded: LoadedStage, sizes: tuple[int, int, int, int]):
        """sizes: max batch size, total tokens, prefill chunk and page size of the cache."""
        self.device, self.params = loaded.device, loaded.params
        names = ("prefill", "decode", BATCHED_DECODE)  # the last: CUDA builds only
        module = loaded.vm.module
        self.entries = {n: loaded.vm[n] for n in names if module.implements_function(n)}
        self.kv_cache = loaded.vm["create_paged_kv_cache"](
            *(ShapeTuple([v]) for v in sizes),
            ShapeTuple([0]),  # no sliding window
        )

    def kv(self, op: str, *args):
        """The `vm.builtin.<op>` KV-cache operation on this stage's cache."""
        return _kv[op](self.kv_cache, *args)

    def forward(self, entry: str, x, args: list[np.ndarray]) -> tvm.runtime.Tensor:
        """`entry` on x (token ids on the host, or the previous stage's hidden state)."""
        x = tvm.runtime.tensor(x, self.device) if isinstance(x, np.ndarray) else x
        if x.device != self.device:
            x = x.copyto(self.device)
        args = [tvm.runtime.tensor(a, self.device) for a in args]
        return self.entries[entry](x, *args, self.kv_cache, self.params)


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_bytes(value: str | int) -> int:
    """Bytes in "64MB", "1.5GiB", "4096" or an int; RelaxlmError naming the value otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        number, unit = (float(match[1]), match[2].upper()) if match else (0.0, "?")
    if unit not in _UNITS or number <= 0:
        raise RelaxlmError(
            f"kv_cache_memory={value!r} is not a size; write bytes as a number with an optional "
            "unit, e.g. 64MB, 1.5GiB or 67108864"
        )
    return int(number * _UNITS[unit])


def kv_bytes_per_token(kv_cache: dict, dtype: str) -> int:
    """Page bytes one token takes in the cache, all layers: the manifest's, or (artifacts from
    before it was recorded) its layout's in the model's dtype."""
    if "bytes_per_token" in kv_cache:
        return int(kv_cache["bytes_per_token"])
    itemsize = 4 if kv_cache.get("dtype", dtype) == "float32" else 2
    return kv_cache["num_layers"] * 2 * kv_cache["num_kv_heads"] * kv_cache["head_dim"] * itemsize


def _tokens_in(memory: str | int, bytes_per_token: int) -> int:
    """Whole pages' worth of tokens that fit in `memory` bytes of KV pages."""
    tokens = parse_bytes(memory) // bytes_per_token
    if tokens < 1:
        raise RelaxlmError(
            f"kv_cache_memory={memory!r} holds no token (one takes {bytes_per_token} bytes); "
            "give the cache more memory"
        )
    return tokens

"""Tensor-parallel shards run by TVM Disco: the session, the all-reduce, the workers' side.

A sharded artifact (manifest.tensor_parallel) holds one library that every shard runs and each
shard's weights. `ShardedStage` opens a Disco session of one worker per shard (threads, or
processes), loads the library and the worker's own weights in each worker, and creates each
worker's paged KV cache (its own key/value heads); `CompiledModel` drives it as one more stage,
so the engine is the same.

Two facts of the PyPI TVM 0.27 wheel shape this file (shared/notes/deps.md):
- `tvm.runtime.disco` is None after `import tvm` (its native half, libtvm_runtime_extra.so, is
  not loaded when the Python module imports); `disco()` loads it and imports the module again.
  (This shim lives here, not in relaxlm/tvm_api.py, because that module imports TVM's compiler
  half, which a runtime-only deployment lacks.)
- No collective library is compiled in (no NCCL, no CPU backend). The compiled graph's
  all-reduce calls `runtime.disco.allreduce`, which dispatches to `runtime.disco.<ccl>.allreduce`
  with the worker's ccl name, empty unless TVM's own `init_ccl` ran. This file registers the
  all-reduce under that empty name, and each worker's collective decides how: on CPUs, each
  worker writes its share into a shared-memory slot and raises its flag, waits for every flag,
  sums the slots in rank order (so every worker gets the same bits), then waits for every worker
  to have read before the slots are reused (one algorithm for threads and processes); on CUDA
  GPUs, NCCL (runtime/nccl.py, a ctypes binding of the nvidia-nccl wheel), shard i on device i.

Run as `python -m relaxlm.runtime.disco ...`: a ProcessSession worker (TVM's own entrypoint
would miss both the shim and these functions).

Imports only the TVM runtime, numpy and relaxlm's artifact format - never compiler code.
"""

import ctypes
import importlib
import os
import sys
import threading
import time
import uuid
import weakref
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from relaxlm.artifacts import Manifest, weight_index
from relaxlm.artifacts.safetensors_io import read
from relaxlm.errors import RelaxlmError
from relaxlm.runtime import nccl
from relaxlm.runtime.loader import library_for_device, load_library, open_device

SESSIONS = ("threaded", "process")
DEVICES = ("cpu", "cuda")
_DISCO = None


def disco():
    """The `tvm.runtime.disco` module, made importable (see the module docstring)."""
    global _DISCO
    if _DISCO is not None:
        return _DISCO
    if tvm.runtime.disco is None:
        lib = Path(tvm.__file__).parent / "lib"
        for name in ("libtvm_runtime.so", "libtvm_runtime_extra.so"):
            if (lib / name).is_file():
                ctypes.CDLL(str(lib / name), ctypes.RTLD_GLOBAL)
        # The failed import left its half-imported modules behind; process_pool registered
        # its global function before the failure, and may not register it twice.
        for name in [m for m in sys.modules if m.startswith("tvm.runtime.disco")]:
            if not name.endswith("process_pool"):
                del sys.modules[name]
    try:
        _DISCO = importlib.import_module("tvm.runtime.disco")
        _DISCO.ThreadedSession  # noqa: B018 - fails here when the native half is missing
    except (ImportError, AttributeError) as e:
        raise RelaxlmError(
            f"TVM {tvm.__version__} has no working Disco runtime ({e}); tensor-parallel "
            "artifacts need a TVM with libtvm_runtime_extra"
        ) from e
    return _DISCO


# -- the workers' side ------------------------------------------------------------------------


class _Collective:
    """One worker's view of the shared-memory all-reduce: N slots of data, two flags each."""

    def __init__(self, name: str, rank: int, workers: int, slot_bytes: int):
        self.shm = shared_memory.SharedMemory(name=name)
        self.rank, self.workers, self.slot_bytes = rank, workers, slot_bytes
        self.generation = 0
        flags = np.ndarray((2, workers), np.int64, self.shm.buf)  # [arrived | done, worker]
        self.arrived, self.done = flags[0], flags[1]
        self.data = self.shm.buf[flags.nbytes :]

    def __del__(self):
        # The views go first: SharedMemory cannot close while they hold its buffer.
        for view in ("arrived", "done", "data"):
            self.__dict__.pop(view, None)
        if "shm" in self.__dict__:
            self.shm.close()

    def slot(self, rank: int, dtype: np.dtype, size: int) -> np.ndarray:
        return np.ndarray((size,), dtype, self.data, rank * self.slot_bytes)

    def allreduce(self, send: np.ndarray) -> np.ndarray:
        if send.nbytes > self.slot_bytes:
            raise RelaxlmError(
                f"all-reduce of {send.nbytes} bytes exceeds the {self.slot_bytes} reserved"
            )
        self.generation += 1
        # Data before flag: x86 keeps stores in order across processes; a weaker memory model
        # (ARM) would want a fence here, which Python does not offer (not tested there).
        self.slot(self.rank, send.dtype, send.size)[:] = send.ravel()
        self.arrived[self.rank] = self.generation
        _wait(lambda: self.arrived.min() >= self.generation)
        total = self.slot(0, send.dtype, send.size).copy()
        for rank in range(1, self.workers):
            total += self.slot(rank, send.dtype, send.size)
        self.done[self.rank] = self.generation
        # Nobody overwrites a slot for the next all-reduce until every worker has read this one.
        _wait(lambda: self.done.min() >= self.generation)
        return total.reshape(send.shape)


def _wait(ready) -> None:
    while not ready():
        time.sleep(0)  # yield: workers may outnumber the cores


# Each Disco worker is one native thread (of the controller, or of a worker process) for the
# life of its session, so a worker's state is kept by thread: sessions side by side never mix.
# (Not threading.local: Python's state for a thread it did not start lasts one callback.)
_WORKERS: dict[int, "_Worker"] = {}


class _Worker:
    """A worker's device and its end of the collective."""

    def __init__(self, device: tvm.runtime.Device, collective):
        self.device, self.collective = device, collective

    def allreduce(self, send, reduce_kind: int, recv) -> None:
        if isinstance(self.collective, nccl.Communicator):
            self.collective.allreduce(
                send.data_ptr(), recv.data_ptr(), send.numel(), str(send.dtype), reduce_kind
            )
            return
        if reduce_kind != 0:  # the graph sums only (frontends/tensor_parallel.py)
            raise RelaxlmError(f"the CPU all-reduce sums; reduce kind {reduce_kind} is not built")
        recv.copyfrom(self.collective.allreduce(send.numpy()))


def _worker_rank() -> int:
    return int(tvm.get_global_func("runtime.disco.worker_rank")())


def _worker() -> _Worker:
    return _WORKERS[threading.get_ident()]


@tvm_ffi.register_global_func("relaxlm.disco.init_cpu", override=True)
def _init_cpu(name: str, workers: int, slot_bytes: int, owner: int) -> None:
    """This worker on the CPU, all-reducing through shared-memory segment `name`."""
    collective = _Collective(name, _worker_rank(), workers, slot_bytes)
    _WORKERS[threading.get_ident()] = _Worker(tvm.cpu(0), collective)
    if os.getpid() != owner:
        # Python < 3.13 tracks attached segments too, and would unlink the controller's
        # segment when this worker exits; the controller owns it.
        resource_tracker.unregister(f"/{name}", "shared_memory")


@tvm_ffi.register_global_func("relaxlm.disco.init_cuda", override=True)
def _init_cuda(unique_id: str, workers: int) -> None:
    """This worker on CUDA device `rank`, all-reducing through NCCL (runtime/nccl.py);
    `unique_id` is the controller's NCCL id, in hex."""
    rank = _worker_rank()
    communicator = nccl.Communicator(bytes.fromhex(unique_id), workers, rank, rank)
    _WORKERS[threading.get_ident()] = _Worker(tvm.cuda(rank), communicator)


@tvm_ffi.register_global_func("runtime.disco..allreduce", override=True)
def _allreduce(send, reduce_kind: int, in_group: bool, recv) -> None:
    # TVM dispatches to `runtime.disco.<ccl>.allreduce` with the worker's ccl name, which
    # only TVM's own (C++) NCCL sets: relaxlm's collectives all live under the empty name.
    _worker().allreduce(send, reduce_kind, recv)


@tvm_ffi.register_global_func("relaxlm.disco.load_vm", override=True)
def _load_vm(library: str):
    """The artifact's VM module on this worker's device (Disco's own loader would put every
    worker on one device: it takes one device for all)."""
    device = _worker().device
    return VirtualMachine(load_library(Path(library), str(device)), device).module


@tvm_ffi.register_global_func("relaxlm.disco.load_params", override=True)
def _load_params(folder: str) -> list:
    """This worker's weights, in the library's order (manifest.tensor_parallel.workers)."""
    manifest = Manifest.read(folder)
    index = weight_index(Path(folder), manifest)
    names = manifest.tensor_parallel["workers"][_worker_rank()]
    return [tvm.runtime.tensor(read(index[name]), _worker().device) for name in names]


@tvm_ffi.register_global_func("relaxlm.disco.int32", override=True)
def _int32(values: ShapeTuple, shape: ShapeTuple):
    """An int32 tensor of `values` in `shape` on the worker's device (token ids, positions)."""
    data = np.asarray(list(values), "int32").reshape(tuple(shape))
    return tvm.runtime.tensor(data, _worker().device)


# -- the controller's side --------------------------------------------------------------------


class ShardedStage:
    """The whole model as N tensor-parallel shards in a Disco session; the interface of
    runtime/model.py's `_Stage` (kv, forward)."""

    def __init__(self, folder: Path, manifest: Manifest, session: str, sizes, device: str = "cpu"):
        """sizes: max batch size, total tokens, prefill chunk and page size of each cache.
        device: "cpu" (every shard on the CPU, a shared-memory all-reduce) or "cuda" (shard i
        on CUDA device i, NCCL)."""
        if session not in SESSIONS:
            raise RelaxlmError(
                f"disco={session!r} is not a Disco session kind; use one of {', '.join(SESSIONS)}"
            )
        kind, _, first = device.partition(":")
        if kind not in DEVICES or first not in ("", "0"):
            raise RelaxlmError(
                f"tensor-parallel shards run on {' or '.join(DEVICES)}, not {device!r} "
                "(shard i takes device i)"
            )
        di = disco()
        self.shards = manifest.tensor_parallel["shards"]
        # What can fail is checked here, before any worker starts.
        library = library_for_device(folder, manifest, kind)
        for i in range(self.shards if kind == "cuda" else 0):
            open_device(f"cuda:{i}")
        if session == "threaded":
            self.session = di.ThreadedSession(self.shards)
        else:
            self.session = di.ProcessSession(self.shards, entrypoint="relaxlm.runtime.disco")
        self.shm = None
        if kind == "cuda":
            self.device = tvm.cuda(0)
            self._func("relaxlm.disco.init_cuda")(nccl.unique_id().hex(), self.shards)
        else:
            self.device = tvm.cpu(0)
            self._init_cpu(manifest, sizes)
        vm = self._func("relaxlm.disco.load_vm")(str(library.resolve()))
        self.vm = di.DModule(vm, self.session)
        self.params = self._func("relaxlm.disco.load_params")(str(folder.resolve()))
        self.entries = {name: self.vm[name] for name in ("prefill", "decode")}
        self.kv_cache = self.vm["create_paged_kv_cache"](
            *(ShapeTuple([v]) for v in sizes), ShapeTuple([0])
        )
        self._int32 = self._func("relaxlm.disco.int32")
        self.session.sync_worker_0()

    def _init_cpu(self, manifest: Manifest, sizes) -> None:
        """The shared-memory segment of the CPU all-reduce, and every worker attached to it."""
        # The largest all-reduce: a forward's tokens by the hidden size, in float32 at most.
        hidden = int(manifest.model_config["hidden_size"])
        slot_bytes = sizes[2] * hidden * 4
        flags = 2 * self.shards * 8
        self.shm = shared_memory.SharedMemory(
            name=f"relaxlm-tp-{uuid.uuid4().hex[:12]}",
            create=True,
            size=flags + self.shards * slot_bytes,
        )
        np.ndarray((flags // 8,), np.int64, self.shm.buf)[:] = 0
        weakref.finalize(self, _free, self.shm)
        init = self._func("relaxlm.disco.init_cpu")
        init(self.shm.name, self.shards, slot_bytes, os.getpid())

    def _func(self, name: str):
        return self.session.get_global_func(name)

    def kv(self, op: str, *args):
        """Apply a `vm.builtin.<op>` KV-cache operation on every worker; worker 0's result."""
        result = self._func(f"vm.builtin.{op}")(self.kv_cache, *args)
        return result.debug_get_from_remote(0) if op.startswith("attention_kv") else None

    def forward(self, entry: str, x: np.ndarray, args: list[np.ndarray]) -> tvm.runtime.Tensor:
        """`entry` over token ids `x` on every shard; the logits (worker 0's: all agree)."""
        inputs = [
            self._int32(ShapeTuple(a.ravel().tolist()), ShapeTuple(a.shape)) for a in (x, *args)
        ]
        out = self.entries[entry](*inputs, self.kv_cache, self.params)
        return out.debug_get_from_remote(0)


def _free(shm: shared_memory.SharedMemory) -> None:
    # The session is not shut down here: it stops when its last DRef dies (each holds it),
    # whereas a shutdown before then makes that DRef's release write to a closed pipe.
    shm.unlink()
    try:
        shm.close()
    except BufferError:  # worker 0 runs in this process and may still view the segment
        pass


def main() -> None:
    """A ProcessSession worker: argv is TVM's (worker id, workers, groups, read fd, write fd)."""
    disco()
    worker_id, workers, groups, reader, writer = (int(a) for a in sys.argv[1:6])
    tvm.get_global_func("runtime.disco.WorkerProcess")(worker_id, workers, groups, reader, writer)


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        pass
    os._exit(0)

"""NCCL for tensor-parallel shards on NVIDIA GPUs: a ctypes binding of the `nvidia-nccl-cu13`
wheel's libnccl (`pip install 'relaxlm[cuda]'`).

The PyPI TVM is built without NCCL (shared/notes/deps.md), and TVM's own NCCL glue is C++ that
would have to be compiled against TVM's headers. What Disco needs from a collective library is
small: a unique id made by the controller, one communicator per worker (`ncclCommInitRank`,
each worker on its own GPU) and an all-reduce over two device pointers. runtime/disco.py calls
these from its `runtime.disco..allreduce` handler, as it calls its shared-memory all-reduce on
CPUs.

Streams: every call passes stream 0, the CUDA context's legacy default stream, which is where
TVM's CUDA runtime launches kernels unless told otherwise; so an all-reduce starts after the
kernels that wrote its input and the next kernel waits for it, with no host synchronization.

The library is found at $RELAXLM_NCCL_LIBRARY, else in the installed `nvidia-nccl-cu13` (or
-cu12) wheel, else wherever the dynamic loader finds libnccl.so.2.

Imports only ctypes and relaxlm's errors - never compiler code.
"""

import ctypes

from relaxlm.errors import RelaxlmError

from .cuda_libraries import find_library, make_current

UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES in nccl.h

# ncclDataType_t and ncclRedOp_t values (nccl.h; tests/test_nccl.py reads them from the wheel's
# header). TVM's Disco names reductions by its ReduceKind (kSum, kProd, kMin, kMax, kAvg = 0..4),
# which orders min and max the other way round.
DATA_TYPES = {
    "int8": 0,
    "uint8": 1,
    "int32": 2,
    "uint32": 3,
    "int64": 4,
    "uint64": 5,
    "float16": 6,
    "float32": 7,
    "float64": 8,
    "bfloat16": 9,
}
REDUCE_OPS = {0: 0, 1: 1, 2: 3, 3: 2, 4: 4}  # Disco ReduceKind -> ncclSum, ncclProd, ncclMin...

_LIBRARY = None


def library() -> ctypes.CDLL:
    """libnccl, loaded once; RelaxlmError saying how to install it where it is missing."""
    global _LIBRARY
    if _LIBRARY is None:
        path = find_library("RELAXLM_NCCL_LIBRARY", ("nccl/lib/libnccl.so.2",), "libnccl.so.2")
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise RelaxlmError(
                f"NCCL ({path}) does not load ({e}); tensor-parallel shards on NVIDIA GPUs "
                "need it: pip install 'relaxlm[cuda]' (the nvidia-nccl-cu13 wheel), or set "
                "RELAXLM_NCCL_LIBRARY to a libnccl.so.2"
            ) from e
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetLastError.restype = ctypes.c_char_p
        _LIBRARY = lib
    return _LIBRARY


def _check(result: int, call: str) -> None:
    if result != 0:
        lib = library()
        raise RelaxlmError(
            f"NCCL {call} failed: {lib.ncclGetErrorString(result).decode()} "
            f"({lib.ncclGetLastError(None).decode()})"
        )


def version() -> str:
    """NCCL's version, e.g. "2.32.6"."""
    code = ctypes.c_int()
    _check(library().ncclGetVersion(ctypes.byref(code)), "ncclGetVersion")
    major, rest = divmod(code.value, 10000)
    return f"{major}.{rest // 100}.{rest % 100}"


def unique_id() -> bytes:
    """A new communicator id, made once by the controller and handed to every worker."""
    uid = (ctypes.c_char * UNIQUE_ID_BYTES)()
    _check(library().ncclGetUniqueId(uid), "ncclGetUniqueId")
    return bytes(uid)


class Communicator:
    """This worker's rank of an NCCL communicator over `ranks` GPUs, on CUDA device `device`."""

    def __init__(self, uid: bytes, ranks: int, rank: int, device: int):
        if len(uid) != UNIQUE_ID_BYTES:
            raise RelaxlmError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, not {len(uid)}")
        lib = library()
        make_current(device)  # NCCL binds a communicator to the calling thread's device
        self.comm = ctypes.c_void_p()
        _check(
            lib.ncclCommInitRank(
                ctypes.byref(self.comm),
                ranks,
                (ctypes.c_char * UNIQUE_ID_BYTES).from_buffer_copy(uid),
                rank,
            ),
            f"ncclCommInitRank (rank {rank} of {ranks}, cuda:{device})",
        )
        self.device = device

    def allreduce(self, send: int, recv: int, count: int, dtype: str, reduce_kind: int) -> None:
        """recv[:count] = the reduction of every rank's send[:count] (device pointers), queued
        on the legacy default stream."""
        if dtype not in DATA_TYPES:
            raise RelaxlmError(f"NCCL does not all-reduce {dtype}: {', '.join(DATA_TYPES)} only")
        _check(
            library().ncclAllReduce(
                ctypes.c_void_p(send),
                ctypes.c_void_p(recv),
                ctypes.c_size_t(count),
                DATA_TYPES[dtype],
                REDUCE_OPS[reduce_kind],
                self.comm,
                None,
            ),
            "ncclAllReduce",
        )

    def __del__(self):
        if getattr(self, "comm", None) and _LIBRARY is not None:
            _LIBRARY.ncclCommDestroy(self.comm)

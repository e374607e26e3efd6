"""cuBLAS for the GEMMs of `--gemm library` artifacts on NVIDIA GPUs: a ctypes binding of the
`nvidia-cublas` wheel's libcublas (`pip install 'relaxlm[cuda]'`).

The PyPI TVM is built without cuBLAS (shared/notes/gpu-h200.md) and its own tensor-core
schedules crash that build (compiler/schedules/gpu.py), so prefill's GEMMs reach the tensor
cores through cuBLAS: `cublasGemmEx` over the tensors' device pointers, float32 accumulation,
on the stream TVM launches its kernels on (TVM's current stream for the device; unset, the
legacy default stream, which both share), so the GEMM runs after the kernels that wrote its
input and before those that read its output, with no host synchronization.

The library is found at $RELAXLM_CUBLAS_LIBRARY, else in the installed `nvidia-cublas` (CUDA 13)
or `nvidia-cublas-cu12` wheel, else wherever the dynamic loader finds libcublas.so.13.

Imports only ctypes and relaxlm's errors - never compiler code.
"""

import ctypes
from dataclasses import dataclass

from relaxlm.errors import RelaxlmError

from .cuda_libraries import find_library, make_current

# cudaDataType_t (library_types.h), cublasOperation_t, cublasComputeType_t, cublasGemmAlgo_t
# (cublas_api.h)
DATA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}
OPERATIONS = {"N": 0, "T": 1}
COMPUTE_32F = 68  # float32 accumulation; float16/bfloat16 inputs still take the tensor cores
GEMM_DEFAULT = -1  # cuBLAS picks the algorithm (tensor cores allowed by default since CUDA 11)

_LIBRARY = None
_HANDLES: dict[int, ctypes.c_void_p] = {}  # CUDA device ordinal -> its cuBLAS handle


@dataclass(frozen=True)
class Gemm:
    """One column-major BLAS GEMM, C = op(A) @ op(B) (m x n, over k), as `cublasGemmEx` and
    Fortran's `sgemm` take it: operations, sizes, pointers and leading dimensions."""

    transa: str
    transb: str
    m: int
    n: int
    k: int
    a: int
    lda: int
    b: int
    ldb: int
    c: int
    ldc: int


def nt_gemm(rows: int, n: int, k: int, x: int, w: int, out: int) -> Gemm:
    """The column-major GEMM that computes row-major out[rows, n] = x[rows, k] @ w[n, k].T.

    Column-major BLAS reads a row-major [r, c] matrix as its transpose ([c, r], leading
    dimension c). So out, read that way, is out.T [n, rows] = w @ x.T: A is w, stored as w.T
    [k, n] (ld k) and transposed back ("T"); B is x, stored as x.T [k, rows] (ld k), as is ("N")."""
    return Gemm("T", "N", n, rows, k, w, k, x, k, out, n)


def library() -> ctypes.CDLL:
    """libcublas, loaded once; RelaxlmError saying how to install it where it is missing."""
    global _LIBRARY
    if _LIBRARY is None:
        path = find_library(
            "RELAXLM_CUBLAS_LIBRARY",
            ("cu13/lib/libcublas.so.13", "cublas/lib/libcublas.so.12"),
            "libcublas.so.13",
        )
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise RelaxlmError(
                f"cuBLAS ({path}) does not load ({e}); an artifact compiled with --gemm library "
                "calls it for its GEMMs on NVIDIA GPUs: pip install 'relaxlm[cuda]' (the "
                "nvidia-cublas wheel), set RELAXLM_CUBLAS_LIBRARY to a libcublas.so, or "
                "recompile with --gemm tir"
            ) from e
        lib.cublasGetStatusString.restype = ctypes.c_char_p
        lib.cublasGetStatusString.argtypes = [ctypes.c_int]
        lib.cublasGemmEx.argtypes = [
            ctypes.c_void_p,  # handle
            *[ctypes.c_int] * 5,  # transa, transb, m, n, k
            ctypes.c_void_p,  # alpha (host)
            *[ctypes.c_void_p, ctypes.c_int, ctypes.c_int] * 2,  # A, Atype, lda; B, Btype, ldb
            ctypes.c_void_p,  # beta (host)
            ctypes.c_void_p,  # C
            *[ctypes.c_int] * 4,  # Ctype, ldc, computeType, algo
        ]
        lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        _LIBRARY = lib
    return _LIBRARY


def _check(result: int, call: str) -> None:
    if result != 0:
        status = library().cublasGetStatusString(result).decode()
        raise RelaxlmError(f"cuBLAS {call} failed: {status} (status {result})")


def _handle(device: int) -> ctypes.c_void_p:
    """Device `device`'s cuBLAS handle, made once with that device's context current (cuBLAS
    binds a handle to the device current when it is created)."""
    if device not in _HANDLES:
        make_current(device)
        handle = ctypes.c_void_p()
        _check(library().cublasCreate_v2(ctypes.byref(handle)), f"cublasCreate (cuda:{device})")
        _HANDLES[device] = handle
    return _HANDLES[device]


def gemm(call: Gemm, dtype: str, device: int, stream: int) -> None:
    """Queue `call` on CUDA device `device`'s `stream` (0: the legacy default stream), every
    matrix of `dtype`, accumulating in float32."""
    if dtype not in DATA_TYPES:
        raise RelaxlmError(f"cuBLAS GEMMs take {', '.join(DATA_TYPES)}, not {dtype}")
    lib, handle = library(), _handle(device)
    _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(stream)), "cublasSetStream")
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    kind = DATA_TYPES[dtype]
    _check(
        lib.cublasGemmEx(
            handle,
            OPERATIONS[call.transa],
            OPERATIONS[call.transb],
            call.m,
            call.n,
            call.k,
            ctypes.byref(alpha),
            ctypes.c_void_p(call.a),
            kind,
            call.lda,
            ctypes.c_void_p(call.b),
            kind,
            call.ldb,
            ctypes.byref(beta),
            ctypes.c_void_p(call.c),
            kind,
            call.ldc,
            COMPUTE_32F,
            GEMM_DEFAULT,
        ),
        f"cublasGemmEx ({dtype}, m={call.m} n={call.n} k={call.k})",
    )

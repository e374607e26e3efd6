"""`relaxlm.gemm_nt`: the packed function `--gemm library` artifacts call for their GEMMs.

compiler/library_gemm.py replaces prefill's weight matmuls by `call_dps_packed("relaxlm.gemm_nt",
x, w)`: out[..., n] = x[..., k] @ w[n, k].T, every tensor of one dtype, dense and row-major as
the VM allocates them. The VM looks the function up by name when it loads a library, so
importing this module (runtime/loader.py does) registers it. Where the tensors are decides who
multiplies:
- CUDA: cuBLAS (runtime/cublas.py), tensor cores for float16 and bfloat16;
- CPU: numpy's matmul, i.e. the BLAS numpy ships (OpenBLAS), float32.

Imports only the TVM runtime, numpy and relaxlm's runtime - never compiler code.
"""

import math

import numpy as np
import tvm_ffi

from relaxlm.artifacts.library_gemm import FUNCTION
from relaxlm.errors import RelaxlmError

from . import cublas

_CPU, _CUDA = 1, 2  # DLPack device types


def gemm_nt(x, w, out) -> None:
    """out = x @ w.T over the last axis of x (tvm.runtime.Tensors on one device)."""
    *lead, k = x.shape
    n = w.shape[0]
    if (
        tuple(w.shape) != (n, k)
        or tuple(out.shape) != (*lead, n)
        or not x.dtype == w.dtype == out.dtype
    ):
        raise RelaxlmError(
            f"{FUNCTION}: x {x.shape} {x.dtype} @ w {w.shape} {w.dtype}.T does not make "
            f"out {out.shape} {out.dtype}; the artifact's graph and this runtime disagree"
        )
    kind = out.device.dlpack_device_type()
    if kind == _CUDA:
        call = cublas.nt_gemm(math.prod(lead), n, k, x.data_ptr(), w.data_ptr(), out.data_ptr())
        stream = tvm_ffi.get_raw_stream(out.device) or 0
        cublas.gemm(call, str(out.dtype), out.device.index, stream)
    elif kind == _CPU:
        # As one [rows, k] matrix: numpy takes leading axes as a batch of separate products
        # (decode's [batch, 1, k] would be `batch` GEMVs, each reading all of w).
        rows = np.from_dlpack(x).reshape(-1, k)
        np.matmul(rows, np.from_dlpack(w).T, out=np.from_dlpack(out).reshape(-1, n))
    else:
        raise RelaxlmError(
            f"{FUNCTION} runs on CUDA and CPU devices, not {out.device}; recompile with --gemm tir"
        )


tvm_ffi.register_global_func(FUNCTION, gemm_nt, override=True)
# A RelaxlmError raised in the function (cuBLAS missing or failing) reaches the VM's caller as
# itself, so the CLI and server report its message, not a RuntimeError with a traceback.
tvm_ffi.register_error("RelaxlmError", RelaxlmError)

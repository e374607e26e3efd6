"""The contract between `--gemm library` graphs (compiler/library_gemm.py) and the runtime that
multiplies for them (runtime/library_gemm.py): the packed function's name, and the dtypes each
device kind's library takes.

`FUNCTION(x, w, out)`: out[..., n] = x[..., k] @ w[n, k].T, one dtype throughout. A library's
manifest entry says `"gemm": "library"` when its graph calls it.

A CUDA library may also have `BATCHED_DECODE`: decode with its weight matmuls as GEMMs over the
batch, which read each weight once a step (compiler/batched_decode.py: cuBLAS's for float weights
with `--gemm library`, TIR's tensor-core GEMM in float16 otherwise). The runtime calls it for
`BATCHED_DECODE_MIN` sequences or more. Below that, decode's own kernels
(compiler/schedules/decode_gemv.py) load each weight at most 4 times, 3 of them from L2, while
the TIR GEMM's 128-row tiles would spend 8x the multiply-adds the batch needs on padding.
(Unmeasured on a GPU: scripts/bench_gpu.py's batch rows say where the two cross.)
"""

FUNCTION = "relaxlm.gemm_nt"
DTYPES = {"cuda": ("float16", "bfloat16", "float32"), "cpu": ("float32",)}
BATCHED_DECODE = "decode_batched"
BATCHED_DECODE_MIN = 16

"""The contract between `--gemm library` graphs (compiler/library_gemm.py) and the runtime that
multiplies for them (runtime/library_gemm.py): the packed function's name, and the dtypes each
device kind's library takes.

`FUNCTION(x, w, out)`: out[..., n] = x[..., k] @ w[n, k].T, one dtype throughout. A library's
manifest entry says `"gemm": "library"` when its graph calls it.

Such a library of a model with float weights also has `BATCHED_DECODE`, decode with its
matmuls in the library, which the runtime calls for `BATCHED_DECODE_MIN` sequences or more:
decode's own kernels load each weight once per 4 sequences (compiler/schedules/decode_gemv.py;
from L2 after the first 4), a GEMM once per step.
"""

FUNCTION = "relaxlm.gemm_nt"
DTYPES = {"cuda": ("float16", "bfloat16", "float32"), "cpu": ("float32",)}
BATCHED_DECODE = "decode_batched"
BATCHED_DECODE_MIN = 8

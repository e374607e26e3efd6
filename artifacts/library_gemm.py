"""The contract between `--gemm library` graphs (compiler/library_gemm.py) and the runtime that
multiplies for them (runtime/library_gemm.py): the packed function's name, and the dtypes each
device kind's library takes.

`FUNCTION(x, w, out)`: out[..., n] = x[..., k] @ w[n, k].T, one dtype throughout. A library's
manifest entry says `"gemm": "library"` when its graph calls it.
"""

FUNCTION = "relaxlm.gemm_nt"
DTYPES = {"cuda": ("float16", "bfloat16", "float32"), "cpu": ("float32",)}

"""LibraryGemm: prefill's weight matmuls become calls of a GEMM library (`--gemm library`).

`matmul(x, permute_dims(w))` with x [..., k] and a 2-D weight w [n, k] becomes
`call_dps_packed("relaxlm.gemm_nt", x, w)` (runtime/library_gemm.py: cuBLAS on CUDA, numpy's
BLAS on CPU) in every function but `decode`: prefill's [1, num_tokens, k] and the logits rows
it keeps, an encoder's [batch, tokens, k]. `decode` keeps its TIR kernels
(compiler/schedules/decode_gemv.py), which load each weight once per 4 sequences and can be
captured in a CUDA graph; batched_decode.py copies it first as `decode_batched`, whose
matmuls the library takes, for the runtime to call with many sequences.

A quantized weight (quantize_weights.py) arrives as `dequantize(parts)`: run before
FuseDequantizeMatmul, this pass leaves that dequantize a kernel of its own, which writes the
float weight the library then multiplies by (vLLM's and AutoAWQ's AWQ layers do so for many tokens:
writing n x k floats once costs far less than a GEMM over many rows re-reading packed weights
in a kernel without tensor cores). Matmuls mixing dtypes, or of dtypes the device's library
does not take, are left to TIR.
"""

import tvm
from tvm import relax

from relaxlm.artifacts.library_gemm import DTYPES, FUNCTION
from relaxlm.errors import RelaxlmError

from .quantize_weights import linear_weight


def check_library_gemm(device: str, dtype: str) -> None:
    """RelaxlmError unless `device`'s library GEMM takes `dtype` activations."""
    if device not in DTYPES:
        raise RelaxlmError(
            f"--gemm library calls cuBLAS on CUDA and numpy's BLAS on CPUs; {device} has no "
            "library GEMM yet: compile it with --gemm tir"
        )
    if dtype not in DTYPES[device]:
        raise RelaxlmError(
            f"--gemm library on {device} takes {' or '.join(DTYPES[device])} activations, not "
            f"{dtype}: compile with --dtype {DTYPES[device][0]} or --gemm tir"
        )


KEPT = "decode"  # the function whose matmuls stay TIR kernels


@tvm.transform.module_pass(opt_level=0, name="LibraryGemm")
class LibraryGemm:
    """Hand the weight matmuls of every function but decode to the library (module docstring)."""

    def __init__(self, device: str):
        self.dtypes = DTYPES[device]  # the device's library (check_library_gemm)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.dtypes)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and gv.name_hint != KEPT:
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, dtypes: tuple[str, ...]):
        super().__init__(mod)
        self.dtypes = dtypes

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        w = linear_weight(self.builder_, call)
        if w is None:
            return call
        x = call.args[0]
        shape, dtype = x.ty.shape, x.ty.dtype
        if not isinstance(shape, relax.ShapeExpr) or dtype not in self.dtypes:
            return call
        if not dtype == w.ty.dtype == call.ty.dtype:
            return call
        out = relax.TensorType([*shape.values[:-1], w.ty.shape[0]], dtype)
        return relax.call_dps_packed(FUNCTION, [x, w], out_ty=out)

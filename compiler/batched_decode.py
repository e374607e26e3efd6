"""`decode_batched`: decode for many sequences through GEMMs that read each weight once a step.

decode's own kernels (schedules/decode_gemv.py) load each weight once per 4 sequences: 8 times
at 32 sequences (from L2 after the first), with the multiply-adds on CUDA cores. A copy of
decode, BATCHED_DECODE, whose weight matmuls are GEMMs over the batch reads each weight once:
- with `--gemm library` (float weights), library_gemm.py hands its matmuls to cuBLAS;
- with TIR kernels, `RowsAsTokens` turns the batch into the rows of one matrix, [b, 1, k] ->
  [1, b, k], the shape of prefill's tokens, so the same kernels take it: the tiled GEMM, on
  CUDA's tensor cores in float16, with a quantized weight's dequantize in its tile loads
  (fuse_dequantize_matmul.py). As [b, 1, k] the batch would be the GEMM's batch axis, one
  row per tile.
The runtime calls it for BATCHED_DECODE_MIN sequences or more (artifacts/library_gemm.py).
"""

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from relaxlm.artifacts.library_gemm import BATCHED_DECODE
from relaxlm.tvm_api import tirx

from .quantize_weights import linear_weight

DECODE = "decode"


def add_batched_decode(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with a copy of `decode` named BATCHED_DECODE (the same inputs and outputs; its own
    variables, as Relax binds each exactly once in a module)."""
    batched = copy_with_new_vars(mod[DECODE]).with_attr("global_symbol", BATCHED_DECODE)
    functions = {**dict(mod.functions_items()), relax.GlobalVar(BATCHED_DECODE): batched}
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)


@tvm.transform.module_pass(opt_level=0, name="RowsAsTokens")
class RowsAsTokens:
    """In BATCHED_DECODE, each weight matmul of x [b, 1, k] multiplies x as [1, b, k]."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        gv = mod.get_global_var(BATCHED_DECODE)
        rewriter = _Rewriter(mod)
        rewriter.builder_.update_func(gv, rewriter.visit_expr(mod[gv]))
        return rewriter.builder_.get()


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if linear_weight(self.builder_, call) is None:
            return call
        x, rhs = call.args
        shape = x.ty.shape
        if not isinstance(shape, relax.ShapeExpr) or len(shape.values) != 3:
            return call
        batch, one, k = shape.values
        if not (isinstance(one, tirx.IntImm) and int(one) == 1):
            return call
        rows = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([1, batch, k])))
        out = self.builder_.emit(relax.op.matmul(rows, rhs, out_dtype=str(call.ty.dtype)))
        return relax.op.reshape(out, relax.ShapeExpr([batch, 1, call.ty.shape.values[-1]]))

"""`decode_batched`: decode for many sequences through GEMMs that read each weight once a step.

decode's own kernels (schedules/decode_gemv.py) load each weight once per 4 sequences: 8 times
at 32 sequences (from L2 after the first), with the multiply-adds on CUDA cores. A copy of
decode, BATCHED_DECODE, whose weight matmuls are GEMMs over the batch reads each weight once:
- with `--gemm library` (float weights), library_gemm.py hands its matmuls to cuBLAS;
- with TIR kernels, `RowsAsTokens` turns the batch into the rows of one matrix, [b, 1, k] ->
  [1, b, k], the shape of prefill's tokens, so the same kernels take it: the tiled GEMM, on
  CUDA's tensor cores in float16, with a quantized weight's dequantize in its tile loads
  (fuse_dequantize_matmul.py). As [b, 1, k] the batch would be the GEMM's batch axis, one
  row per tile. After fusion `MarkFewRows` gives those GEMMs their own kernels, marked for a
  schedule of tiles a few rows tall (schedules/few_rows.py) where prefill's are 128.
The runtime calls it for BATCHED_DECODE_MIN sequences or more (artifacts/library_gemm.py).
"""

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from relaxlm.artifacts.library_gemm import BATCHED_DECODE
from relaxlm.tvm_api import tirx

from .quantize_weights import linear_weight
from .schedules.few_rows import FEW_ROWS

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


@tvm.transform.module_pass(opt_level=0, name="MarkFewRows")
class MarkFewRows:
    """Each fused kernel BATCHED_DECODE calls with the batch as rows (an output [1, batch, n],
    from RowsAsTokens) marked FEW_ROWS. A kernel another function calls too (prefill's of the
    same shapes: legalization made one PrimFunc of both) is copied first, so prefill keeps its
    own schedule."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if BATCHED_DECODE not in {gv.name_hint for gv in mod.get_global_vars()}:
            return mod
        shared = set()
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and gv.name_hint != BATCHED_DECODE:
                shared |= _called(func)
        builder = relax.BlockBuilder(mod)
        renamed = {}
        for callee in _called(mod[BATCHED_DECODE]):
            if not _rows_as_tokens(mod[callee]):
                continue
            marked = mod[callee].with_attr(FEW_ROWS, True)
            if callee in shared:
                renamed[callee] = builder.add_func(marked, f"{callee.name_hint}_few_rows")
            else:
                builder.update_func(callee, marked)
        gv = mod.get_global_var(BATCHED_DECODE)
        builder.update_func(gv, _Retarget(renamed).visit_expr(mod[gv]))
        return builder.get()


def _called(func: relax.Function) -> set:
    """The GlobalVars of the PrimFuncs `func` calls through call_tir."""
    calls = set()
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == call_tir:
            calls.add(expr.args[0])

    relax.analysis.post_order_visit(func, visit)
    return calls


def _rows_as_tokens(func) -> bool:
    """Whether a PrimFunc's output is [1, rows, n], rows symbolic."""
    if not isinstance(func, tirx.PrimFunc):
        return False
    shape = list(getattr(func.params[-1].ty, "shape", []))
    return (
        len(shape) == 3
        and isinstance(shape[0], tirx.IntImm)
        and int(shape[0]) == 1
        and not isinstance(shape[1], tirx.IntImm)
    )


@relax.expr_functor.mutator
class _Retarget(relax.PyExprMutator):
    """Calls to the kernels in `renamed` made to their copies."""

    def __init__(self, renamed: dict):
        super().__init__()
        self.renamed = renamed

    def visit_global_var_(self, gv: relax.GlobalVar) -> relax.Expr:
        return self.renamed.get(gv, gv)

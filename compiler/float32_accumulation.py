"""AccumulateInFloat32: a 16-bit model's linear layers sum their products in float32.

A float16 or bfloat16 matmul accumulates in its own dtype unless told otherwise (TOPI's and
relaxlm's kernels sum into the output's dtype), so every partial sum of an 8B model's
down_proj (k = 14,336) is rounded to 11 (float16) or 8 (bfloat16) bits: measured in numpy with
16-deep exact chunks, as a tensor core adds them, float16 accumulation has 20x the rms error of
summing in float32 and rounding once (4.2e-3 against 2.1e-4 on outputs of unit size). cuBLAS,
and so transformers, sums in float32. Each `matmul(x, permute_dims(w))` whose result is 16-bit
becomes `astype(matmul(..., out_dtype="float32"), dtype)`; the kernels built from it multiply
16-bit operands and add in float32 (a tensor core's float32-accumulator MMA, the same rate on
datacenter GPUs), and the cast is the kernel's epilogue. For GPU builds: on the CPU the 16-bit
dtypes are rare and its schedules are tuned for the kernels as they are.
"""

import tvm
from tvm import relax

from .quantize_weights import linear_weight

SIXTEEN_BIT = ("float16", "bfloat16")


@tvm.transform.module_pass(opt_level=0, name="AccumulateInFloat32")
class AccumulateInFloat32:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        dtype = str(call.ty.dtype) if isinstance(call.ty, relax.TensorType) else ""
        if dtype not in SIXTEEN_BIT or linear_weight(self.builder_, call) is None:
            return call
        x, rhs = call.args
        wide = self.builder_.emit(relax.op.matmul(x, rhs, out_dtype="float32"))
        return relax.op.astype(wide, dtype)

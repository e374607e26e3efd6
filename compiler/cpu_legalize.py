"""How some Relax ops become kernels on CPU targets (LegalizeOps overrides).

TVM's legalizations are written for its schedulers: SiLU's sigmoid lowers to one scalar libm
`exp` call per vector lane, and RMSNorm to a chain of blocks no CPU rule here schedules, so it
ran serially with a scalar sum of squares (768 dependent adds a row). On CPU, float32 sigmoid
and SiLU are built from `vector_math.sigmoid`, and RMSNorm over the last axis is one kernel:
rows in parallel, the sum of squares in 16 vector lanes. On every target, gathers clip their
indices and bfloat16 LayerNorm computes in float32. Anything else legalizes as TVM does.
"""

import tvm
from tvm import relax, te, topi

from relaxlm.tvm_api import T, tirx

from .vector_math import sigmoid, widest_lanes


def legalizations(device: str) -> dict:
    """The LegalizeOps overrides for a target's device kind ("cpu", "cuda", ...)."""
    every_target = {"relax.take": _clipped_take, "relax.nn.layer_norm": _layer_norm}
    if device != "cpu":
        return every_target
    return {
        **every_target,
        "relax.sigmoid": _elementwise("relax.sigmoid", sigmoid),
        "relax.nn.silu": _elementwise("relax.nn.silu", lambda x: x * sigmoid(x)),
        "relax.nn.rms_norm": _rms_norm,
    }


def legalize_and_fuse(mod: tvm.IRModule, device: str) -> tvm.IRModule:
    """Relax ops to TIR with these overrides, fused into kernels (before scheduling)."""
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(legalizations(device)),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
    )(mod)


def _clipped_take(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    # TVM's default gather ("fast") reads out of bounds on a bad index and warns so at every
    # compile; ids are checked before they reach the library, and a clip costs two integer
    # ops per gathered row.
    return bb.call_te(topi.take, call.args[0], call.args[1], call.attrs.axis, mode="clip")


def _layer_norm(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    # TVM's LayerNorm kernel takes float32 and float16 only (an InternalError for bfloat16, which
    # has float32's range): bfloat16 is normalized in float32, as torch does, and rounded once.
    if call.args[0].ty.dtype != "bfloat16":
        return _default("relax.nn.layer_norm")(bb, call)

    def layer_norm(x, gamma, beta):
        x, gamma, beta = (topi.cast(t, "float32") for t in (x, gamma, beta))
        y = topi.nn.layer_norm(x, gamma, beta, axis=call.attrs.axes, epsilon=call.attrs.epsilon)
        return topi.cast(y, "bfloat16")

    return bb.call_te(layer_norm, *call.args, primfunc_name_hint="layer_norm")


def _default(name: str):
    return tvm.ir.Op.get(name).get_attr("FLegalize")


def _elementwise(name: str, build):
    """float32 `name` as te.compute of `build` per element; other dtypes as TVM does."""
    short = name.split(".")[-1]

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if call.args[0].ty.dtype != "float32":
            return _default(name)(bb, call)
        return bb.call_te(
            lambda x: te.compute(x.shape, lambda *i: build(x(*i)), name=short),
            call.args[0],
            primfunc_name_hint=short,
        )

    return legalize


def _rms_norm(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    x, weight = call.args
    shape = x.ty.shape.values if x.ty.shape is not None else None
    axes = [int(a) for a in call.attrs.axes]
    last_axis_only = shape is not None and axes in ([-1], [len(shape) - 1])
    if not (
        last_axis_only
        and x.ty.dtype == weight.ty.dtype == "float32"
        and isinstance(shape[-1], tirx.IntImm)
    ):
        return _default("relax.nn.rms_norm")(bb, call)
    d = int(shape[-1])
    kernel = bb.add_func(rms_norm_kernel(d, float(call.attrs.epsilon)), f"rms_norm_{d}")
    rows = bb.emit(relax.op.reshape(x, (-1, d)))
    out = bb.emit(
        relax.call_tir(kernel, [rows, weight], relax.TensorType(rows.ty.shape, "float32"))
    )
    return relax.op.reshape(out, x.ty.shape)


def rms_norm_kernel(d: int, epsilon: float) -> tirx.PrimFunc:
    """out[r] = x[r] / sqrt(mean(x[r]**2) + epsilon) * weight, for x [rows, d] float32."""
    lanes = widest_lanes(d)

    @T.prim_func(private=True)
    def rms_norm(var_x: T.handle, weight: T.Buffer((d,), "float32"), var_out: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, d), "float32")
        out = T.match_buffer(var_out, (rows, d), "float32")
        # One decode row: a parallel launch would cost more than the row.
        if rows == 1:
            _norm_row(x, weight, out, 0, d, lanes, epsilon)
        else:
            for r in T.parallel(rows):
                _norm_row(x, weight, out, r, d, lanes, epsilon)

    return rms_norm


@T.macro(hygienic=False)
def _norm_row(x, weight, out, r, d, lanes, epsilon):
    # default scope: small stack arrays that LLVM keeps in registers
    partial = T.alloc_buffer((lanes,), "float32")
    scale = T.alloc_buffer((1,), "float32")
    for lane in T.vectorized(lanes):
        partial[lane] = T.float32(0)
    for c in T.serial(d // lanes):
        for lane in T.vectorized(lanes):
            partial[lane] += x[r, c * lanes + lane] * x[r, c * lanes + lane]
    scale[0] = T.float32(0)
    for lane in T.serial(lanes):
        scale[0] += partial[lane]
    scale[0] = T.rsqrt(scale[0] / T.float32(d) + T.float32(epsilon))
    for c in T.serial(d // lanes):
        for lane in T.vectorized(lanes):
            out[r, c * lanes + lane] = scale[0] * x[r, c * lanes + lane] * weight[c * lanes + lane]

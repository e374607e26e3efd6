"""FuseDequantizeMatmul: `matmul(x, permute_dims(dequantize(parts)))` becomes one kernel.

quantize_weights leaves the naive form (easy to test against numpy); this pass folds the
dequantize into the matmul's reduction so the float weight is never materialised: the
kernel reads packed weights once, which is what makes decode fast. A row gather of packed
weights, `take(dequantize(parts), ids, axis=0)` (an embedding), likewise becomes one kernel
that dequantizes only the rows it reads.

With `int8_dot` (the CPU's int8 dot product: int8_dot.int8_dot_flavour), a weight of a scheme
whose activations are rounded to integers (`q4-a8`, and `q4` and `q8` in row tiles) instead
becomes one int8_dot.py kernel, which quantizes its input rows and then takes int8 dot
products with the packed weights; a residual `add` of its output joins that kernel. Elsewhere
such a weight takes the float kernel, exact against its dequantized weights.

On GPUs (`gpu=True`) a matmul over many rows (prefill's tokens: anything but decode's one row
per sequence) is one kernel of two blocks instead, the dequantize and then a plain matmul that
reads it. The GPU matmul rule (schedules/gpu.py) recognises that matmul, as it cannot a reduction
reading packed words through a non-affine index, and inlines the dequantize into its
shared-memory tile loads: a tiled GEMM (on CUDA's tensor cores in float16) that still reads only
packed weights from memory. Decode keeps the one reduction, which DecodeGEMV streams.
"""

import json

import tvm
from tvm import relax, te

from relaxlm.tvm_api import tirx

from . import int8_dot
from .int8_dot import Int8Dot
from .quantization import QuantScheme
from .quantize_weights import DEQUANTIZE_ATTR, dequantize_te, is_op


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
class FuseDequantizeMatmul:
    """Fuse each dequantize feeding a linear matmul into a single reduction kernel."""

    def __init__(self, int8_dot: Int8Dot | None = None, gpu: bool = False):
        assert int8_dot is None or isinstance(int8_dot, Int8Dot), f"a flavour, not {int8_dot!r}"
        self.int8_dot = int8_dot
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        dequantizers = {
            gv: json.loads(str(f.attrs[DEQUANTIZE_ATTR]))
            for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs and DEQUANTIZE_ATTR in f.attrs
        }
        if not dequantizers:
            return mod
        rewriter = _Rewriter(mod, dequantizers, self.int8_dot, self.gpu)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, dequantizers: dict, int8_dot: Int8Dot | None, gpu: bool):
        super().__init__(mod)
        self.dequantizers = dequantizers
        self.int8_dot = int8_dot
        self.gpu = gpu
        # (n, k, Kp, scale dtype, activations, bits, mins, scale group, super group), residual
        # -> kernel; and
        # each kernel without residual -> its key
        self.int8_kernels: dict[tuple, relax.GlobalVar] = {}
        self.int8_keys: dict[relax.GlobalVar, tuple] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if is_op(call, "relax.take"):
            return self._gather(call)
        if is_op(call, "relax.add") and self.int8_keys:
            return self._add_residual(call)
        if not is_op(call, "relax.matmul"):
            return call
        x, rhs = call.args
        transposed = self._binding(rhs)
        if not is_op(transposed, "relax.permute_dims"):
            return call
        found = self._dequantize(transposed.args[0])
        if found is None:
            return call
        scheme, parts, n, k = found
        out_dtype = call.ty.dtype
        if self._int8_dot_applies(scheme, x, n, k, out_dtype):
            return self._int8_matmul(x, parts, n, k, scheme)

        tiles = self.gpu and _many_rows(x)
        # weights dequantized to the activations' dtype, products summed in the output's (wider
        # where float32_accumulation.py asked for it)
        dtype = x.ty.dtype if x.ty.dtype in ("float16", "bfloat16", "float32") else out_dtype

        def compute(x_te, *parts_te):
            def dequantized(j, r):
                return dequantize_te(scheme, list(parts_te), j, r, dtype)

            # on a GPU over many rows, a block of its own, which the GEMM's tile loads take in
            w = te.compute((n, k), dequantized, name="dequantize") if tiles else None
            r = te.reduce_axis((0, k), name="k")
            return te.compute(
                (*x_te.shape[:-1], n),
                lambda *i: te.sum(
                    x_te[(*i[:-1], r)].astype(dtype).astype(out_dtype)
                    * (dequantized(i[-1], r) if w is None else w[i[-1], r]).astype(out_dtype),
                    axis=r,
                ),
                name="NT_matmul",
            )

        name = scheme.name.replace("-", "_")
        return self.builder_.call_te(
            compute, x, *parts, primfunc_name_hint=f"dequantize_{name}_NT_matmul"
        )

    def _int8_dot_applies(self, scheme, x: relax.Expr, n: int, k: int, out_dtype: str) -> bool:
        return (
            self.int8_dot is not None
            and scheme.activations in int8_dot.PIECES
            and scheme.bits in (4, 5, 6, 8)
            and (scheme.symmetric or scheme.activations == "int8")
            and scheme.row_tile == int8_dot.TILE
            and x.ty.dtype == out_dtype == "float32"
            and int8_dot.supports(n, scheme.padded_k(k))
            and (
                scheme.scale_dtype_for(out_dtype) in ("float16", "float32")
                # GGUF's K-quants: integer scales times a float16 d per super-block
                or (
                    scheme.super_group % int8_dot.GROUP == 0
                    and scheme.super_group > 0
                    and scheme.scale_dtype in ("uint8", "int8")
                )
            )
            # a scale per 32 weights, or per 16 (GGUF's Q6_K / Q3_K: 6- / 4-bit codes, int8
            # activations)
            and (
                scheme.group_size == int8_dot.GROUP
                or (
                    scheme.group_size == 16
                    and scheme.bits in (4, 6, 8)
                    and scheme.symmetric
                    and scheme.activations == "int8"
                )
            )
        )

    def _int8_matmul(self, x: relax.Expr, parts: list, n: int, k: int, scheme: QuantScheme):
        """x [..., k] @ the packed weight [n, k] by int8 dot products (one kernel, x as 3-D)."""
        lead = list(x.ty.shape.values[:-1])
        rows = x if len(lead) == 2 else self.builder_.emit(relax.op.reshape(x, (1, -1, k)))
        key = (
            n,
            k,
            scheme.padded_k(k),
            parts[1].ty.dtype,
            scheme.activations,
            scheme.bits,
            not scheme.symmetric,  # mins (GGUF Q4_1 / Q4_K repacked)
            scheme.group_size,
            scheme.super_group,
        )
        kernel = self._int8_kernel(key, residual=False)
        out = relax.call_tir(
            kernel, [rows, *parts], relax.TensorType((*rows.ty.shape.values[:-1], n), "float32")
        )
        if len(lead) == 2:
            return out
        return relax.op.reshape(self.builder_.emit(out), (*lead, n))

    def _int8_kernel(self, key: tuple, residual: bool) -> relax.GlobalVar:
        """The kernel for key (n, k, Kp, scale dtype, activations, bits, mins, scale group,
        super group), added to the module on first use."""
        if (key, residual) not in self.int8_kernels:
            n, k, k_padded, scale_dtype, activations, bits, mins, group, supers = key
            name = f"q{bits}{'_min' if mins else ''}_{activations}_linear_{n}_{k}"
            name += f"_g{group}" if group != int8_dot.GROUP else ""
            name += f"_s{supers}" if supers else ""
            name += "_add" if residual else ""
            func = int8_dot.int8_linear(
                n,
                k,
                k_padded,
                scale_dtype,
                residual,
                activations,
                bits,
                mins,
                group,
                supers,
                flavour=self.int8_dot,
            )
            kernel = self.builder_.add_func(func, name)
            self.int8_kernels[(key, residual)] = kernel
            if not residual:
                self.int8_keys[kernel] = key
        return self.int8_kernels[(key, residual)]

    def _add_residual(self, call: relax.Call) -> relax.Expr:
        """add(int8 linear, r) -> one kernel adding r as it writes its outputs."""
        for ours, residual in (call.args, reversed(call.args)):
            linear = self._binding(ours)
            if not (is_op(linear, "relax.call_tir") and linear.args[0] in self.int8_keys):
                continue
            if residual.ty.dtype != "float32" or list(residual.ty.shape.values) != list(
                ours.ty.shape.values
            ):
                continue
            x, *parts = linear.args[1].fields
            kernel = self._int8_kernel(self.int8_keys[linear.args[0]], residual=True)
            return relax.call_tir(kernel, [x, *parts, residual], ours.ty)
        return call

    def _gather(self, call: relax.Call) -> relax.Expr:
        """take(dequantize(parts), ids, axis=0) -> rows dequantized straight from the parts."""
        table, ids = call.args
        if call.attrs.axis is None or int(call.attrs.axis) != 0:
            return call
        found = self._dequantize(table)
        if found is None:
            return call
        scheme, parts, _, k = found
        out_dtype = call.ty.dtype

        def compute(ids_te, *parts_te):
            return te.compute(
                (*ids_te.shape, k),
                lambda *i: dequantize_te(scheme, list(parts_te), ids_te[i[:-1]], i[-1], out_dtype),
                name="take",
            )

        name = scheme.name.replace("-", "_")
        return self.builder_.call_te(
            compute, ids, *parts, primfunc_name_hint=f"dequantize_{name}_take"
        )

    def _dequantize(self, expr: relax.Expr):
        """(scheme, parts, n, k) when `expr` is bound to a dequantize call, else None."""
        dequant = self._binding(expr)
        if not (is_op(dequant, "relax.call_tir") and dequant.args[0] in self.dequantizers):
            return None
        info = self.dequantizers[dequant.args[0]]
        parts = list(dequant.args[1].fields)
        scheme = QuantScheme(**info["scheme"])
        return scheme, parts, int(parts[0].ty.shape[0]), int(info["k"])

    def _binding(self, expr: relax.Expr) -> relax.Expr | None:
        if isinstance(expr, relax.Var):
            return self.builder_.lookup_binding(expr)
        return expr


def _many_rows(x: relax.Expr) -> bool:
    """Whether x [..., rows, k] has rows other than decode's one per sequence."""
    shape = x.ty.shape.values
    return len(shape) >= 2 and not (isinstance(shape[-2], tirx.IntImm) and int(shape[-2]) == 1)

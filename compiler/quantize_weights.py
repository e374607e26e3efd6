"""QuantizeWeights: weight matmuls become dequantize + matmul over packed weights.

Works on any Relax function whose last parameter is the packed weight tuple (`num_input`
splits runtime inputs from weights, as `nn.Module.export_tvm` emits). A weight is quantized
when it is a 2-D float tensor and every use is `matmul(x, permute_dims(w))` (a linear layer);
others, such as an embedding table read by `take`, stay as they are.

The rewritten tuple holds each quantized weight's parts in place of the weight; the plan of
the new tuple is left in the module attribute `relaxlm.param_plan` (JSON list of
{"source": index in the old tuple, "part": "" | "q" | "scale" | "zero", "shape", "dtype"})
so the weight converter produces exactly those tensors.
"""

import json

import tvm
from tvm import relax, te, tirx

from .quantization import INTERLEAVE, QuantScheme

PLAN_ATTR = "relaxlm.param_plan"
DEQUANTIZE_ATTR = "relaxlm.dequantize"  # on the dequantize PrimFuncs: the scheme, as JSON


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeights")
class QuantizeWeights:
    """Replace linear-layer weights by packed parts and a dequantize call."""

    def __init__(self, scheme: QuantScheme, compute_dtype: str):
        self.scheme = scheme
        self.compute_dtype = compute_dtype

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        funcs = {gv: f for gv, f in mod.functions_items() if _packed_params(f) is not None}
        if not funcs:
            return mod
        fields = list(_packed_params(next(iter(funcs.values()))).ty.fields)
        # A weight is quantized only if it is a linear weight in every function that uses it.
        chosen = set(range(len(fields)))
        for func in funcs.values():
            chosen &= _linear_weights(func)
        chosen = {i for i in chosen if _is_float_matrix(fields[i])}
        plan, new_fields, layout = [], [], {}
        for i, ty in enumerate(fields):
            if i not in chosen:
                layout[i] = [len(new_fields)]
                plan.append({"source": i, "part": "", "shape": _shape(ty), "dtype": str(ty.dtype)})
                new_fields.append(ty)
                continue
            n, k = _shape(ty)
            layout[i] = []
            for part, shape in self.scheme.part_shapes(n, k).items():
                dtype = (
                    self.compute_dtype if part in ("scale", "zero") else self.scheme.storage_dtype
                )
                layout[i].append(len(new_fields))
                plan.append({"source": i, "part": part, "shape": list(shape), "dtype": dtype})
                new_fields.append(relax.TensorType(shape, dtype))
        rewriter = _Rewriter(mod, self.scheme, self.compute_dtype, layout, chosen, new_fields)
        for gv, func in funcs.items():
            rewriter.rewrite(gv, func)
        return rewriter.builder_.get().with_attr(PLAN_ATTR, json.dumps(plan))


def param_plan(mod: tvm.IRModule) -> list[dict] | None:
    """The weight plan `QuantizeWeights` left, or None if it did not run."""
    if mod.attrs is None or PLAN_ATTR not in mod.attrs:
        return None
    return json.loads(str(mod.attrs[PLAN_ATTR]))


def dequantize_te(scheme: QuantScheme, parts: list[te.Tensor], n, k, dtype: str):
    """The float value of weight element [n, k] from its packed parts (a TE expression)."""
    if scheme.kind == "cast":
        return parts[0][n, k].astype(dtype)
    q, scale = parts[0], parts[1]
    group = k // scheme.group_size
    if scheme.storage_dtype == "int8":
        code = q[n, k].astype(dtype)
    else:  # interleaved blocks, see quantization.py
        lanes = INTERLEAVE // scheme.per_word
        word = q[n, k // INTERLEAVE * lanes + k % lanes]
        shift = (k % INTERLEAVE // lanes * scheme.bits).astype("uint32")
        mask = tirx.const((1 << scheme.bits) - 1, "uint32")
        code = ((word >> shift) & mask).astype("int32").astype(dtype)
        if scheme.symmetric:
            code = code - tirx.const(1 << (scheme.bits - 1), dtype)
    if not scheme.symmetric:
        code = code - parts[2][n, group]
    return code * scale[n, group]


def _packed_params(func) -> relax.Var | None:
    if not isinstance(func, relax.Function) or not func.params:
        return None
    if func.attrs is None or "num_input" not in func.attrs:
        return None
    last = func.params[-1]
    return last if isinstance(last.ty, relax.TupleType) else None


def _is_float_matrix(ty) -> bool:
    return (
        isinstance(ty, relax.TensorType)
        and ty.ndim == 2
        and ty.dtype in ("float32", "float16", "bfloat16")
        and all(isinstance(d, tirx.IntImm) for d in ty.shape)
    )


def _shape(ty) -> list[int]:
    return [int(d) for d in ty.shape]


def _linear_weights(func: relax.Function) -> set[int]:
    """Indices of packed params whose every use is matmul(x, permute_dims(w))."""
    params = _packed_params(func)
    index: dict[relax.Var, int] = {}
    uses: dict[relax.Var, list[tuple[relax.Call, int]]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(params):
                index[binding.var] = value.index
                continue
            args = list(value.args) if isinstance(value, relax.Call) else []
            for var in relax.analysis.free_vars(value):
                pos = next((p for p, a in enumerate(args) if a.same_as(var)), -1)
                uses.setdefault(var, []).append((binding.var, value, pos))
    linear = set()
    for var, i in index.items():
        ok = bool(uses.get(var))
        for out, call, _ in uses.get(var, []):
            transposed = _is_op(call, "relax.permute_dims") and (
                call.attrs.axes is None or [int(a) for a in call.attrs.axes] == [1, 0]
            )
            ok &= transposed and all(
                _is_op(c, "relax.matmul") and pos == 1 for _, c, pos in uses.get(out, [])
            )
            ok &= bool(uses.get(out))
        if ok:
            linear.add(i)
    return linear


def _is_op(call, name: str) -> bool:
    return isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get(name))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, scheme, compute_dtype, layout, chosen, new_fields):
        super().__init__(mod)
        self.scheme = scheme
        self.compute_dtype = compute_dtype
        self.layout = layout
        self.chosen = chosen
        self.new_fields = new_fields
        self._old = None
        self._new = None

    def rewrite(self, gv, func: relax.Function) -> None:
        self._old = func.params[-1]
        self._new = relax.Var(self._old.name, relax.TupleType(self.new_fields))
        body = self.visit_expr(func.body)
        params = [*func.params[:-1], self._new]
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        self.builder_.update_func(gv, new_func)

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        if not op.tuple_value.same_as(self._old):
            return super().visit_tuple_getitem_(op)
        slots = self.layout[op.index]
        if op.index not in self.chosen:
            return relax.TupleGetItem(self._new, slots[0])
        parts = [self.builder_.emit(relax.TupleGetItem(self._new, j)) for j in slots]
        n, k = _shape(self._old.ty.fields[op.index])
        return self.builder_.call_te(
            _dequantize_compute(self.scheme, n, k, self.compute_dtype),
            *parts,
            primfunc_name_hint=f"dequantize_{self.scheme.name.replace('-', '_')}",
            primfunc_attrs={DEQUANTIZE_ATTR: json.dumps({"scheme": self.scheme.name, "k": k})},
        )


def _dequantize_compute(scheme: QuantScheme, n: int, k: int, dtype: str):
    def compute(*parts):
        return te.compute(
            (n, k), lambda i, j: dequantize_te(scheme, list(parts), i, j, dtype), name="dequantize"
        )

    return compute

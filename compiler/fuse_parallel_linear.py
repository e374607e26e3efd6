"""fuse_parallel_linear: linear layers that read the same input become one wider matmul.

q/k/v projections and an MLP's gate/up read the same normalized hidden state. As separate
matmuls each is a kernel launch and, at decode, a GEMV too narrow to keep every core busy;
as one matmul over the row-concatenated weight they are one launch over all the rows. The
numbers do not change: every output element is the same dot product.

Works on functions whose last parameter is the packed weight tuple (as `quantize_weights`).
Weights `w1..wn` are fused when, in every such function, each is used exactly once, as
`matmul(x, permute_dims(w))` with the same `x`, and they agree in dtype, K and stored format
(`stored`: packed-param index -> scheme of a weight kept as stored, e.g. GGUF blocks, whose
rows may only be concatenated with rows of the same format). The fused weight replaces the
first of its group in the tuple; each original output becomes a slice of the wide one, and
`concat` of all the slices in order (the frontends' fused qkv) becomes the wide output itself.

The pass returns the new tuple's provenance with the module: per new field, the old indices
whose rows it concatenates, in order.
"""

import tvm
from tvm import relax

from .quantization import QuantScheme
from .quantize_weights import is_op, packed_params, static_shape


def fuse_parallel_linear(
    mod: tvm.IRModule, stored: dict[int, QuantScheme] | None = None
) -> tuple[tvm.IRModule, list[tuple[int, ...]]]:
    """Concatenate the weights of linear layers that share an input.

    Returns the rewritten module and, per field of its weight tuple, the old indices whose rows
    it concatenates, in order (one each where nothing fused; empty without packed weights).
    """
    stored = stored or {}
    funcs = {gv: f for gv, f in mod.functions_items() if packed_params(f) is not None}
    if not funcs:
        return mod, []
    fields = list(packed_params(next(iter(funcs.values()))).ty.fields)
    groups = set.intersection(*(_parallel_groups(f) for f in funcs.values()))
    groups = sorted(g for g in groups if _fusable(g, fields, stored))
    if not groups:
        return mod, [(i,) for i in range(len(fields))]
    sources, new_fields, slot = _new_tuple(fields, groups)
    rewriter = _Rewriter(mod, groups, slot, new_fields)
    for gv, func in funcs.items():
        rewriter.rewrite(gv, func)
    return rewriter.builder_.get(), sources


def _fusable(group: tuple[int, ...], fields: list, stored: dict[int, QuantScheme]) -> bool:
    types = [fields[i] for i in group]
    shapes = [static_shape(t) for t in types]
    if any(s is None or len(s) != 2 for s in shapes):
        return False
    formats = {getattr(stored.get(i), "name", None) for i in group}
    return (
        len({t.dtype for t in types}) == 1
        and len({s[1] for s in shapes}) == 1
        and len(formats) == 1
    )


def _parallel_groups(func: relax.Function) -> set[tuple[int, ...]]:
    """Sets (>= 2, sorted) of packed-param indices used only as linear weights of one input."""
    params = packed_params(func)
    index: dict[relax.Var, int] = {}  # weight var -> packed index
    transposed: dict[relax.Var, relax.Var] = {}  # permute_dims var -> weight var
    inputs: dict[relax.Var, relax.Expr] = {}  # weight var -> the matmul's input
    uses: dict[relax.Var, int] = {}
    for binding in _bindings(func):
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(params):
            index[binding.var] = value.index
            continue
        for var in relax.analysis.free_vars(value):
            uses[var] = uses.get(var, 0) + 1
        if _is_transpose(value) and value.args[0] in index:
            transposed[binding.var] = value.args[0]
        elif is_op(value, "relax.matmul") and value.args[1] in transposed:
            inputs[transposed[value.args[1]]] = value.args[0]
    transpose_of = {w: t for t, w in transposed.items()}  # a weight used once has one
    by_input: dict[relax.Expr, list[int]] = {}
    for weight, x in inputs.items():
        if uses.get(weight) == 1 and uses.get(transpose_of[weight]) == 1:
            by_input.setdefault(x, []).append(index[weight])
    return {tuple(sorted(g)) for g in by_input.values() if len(g) > 1}


def _new_tuple(fields: list, groups: list[tuple[int, ...]]):
    """The new tuple's fields, each one's old sources, and old index -> (new index, row range)."""
    first = {g[0]: g for g in groups}
    members = {i for g in groups for i in g}
    sources, new_fields, slot = [], [], {}
    for i, ty in enumerate(fields):
        if i in members and i not in first:
            continue
        group = first.get(i, (i,))
        rows = 0
        for j in group:
            n = static_shape(fields[j])[0] if j in members else None
            slot[j] = (len(new_fields), rows, None if n is None else rows + n)
            rows += n or 0
        if i in first:
            ty = relax.TensorType([rows, static_shape(ty)[1]], ty.dtype)
        sources.append(tuple(group))
        new_fields.append(ty)
    return sources, new_fields, slot


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, groups, slot, new_fields):
        super().__init__(mod)
        self.group_of = {i: g for g in groups for i in g}
        self.slot = slot  # old index -> (new index, first row, end row or None)
        self.new_fields = new_fields

    def rewrite(self, gv, func: relax.Function) -> None:
        self._old = func.params[-1]
        self._new = relax.Var(self._old.name, relax.TupleType(self.new_fields))
        self._weights: dict[relax.Var, int] = {}  # dropped weight / permute vars -> old index
        self._wide: dict[tuple, relax.Var] = {}  # group -> its wide matmul output
        self._slices: dict[relax.Var, tuple[tuple, int]] = {}  # old output -> (group, member)
        body = self.visit_expr(func.body)
        params = [*func.params[:-1], self._new]
        self.builder_.update_func(
            gv, relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        )

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        if not op.tuple_value.same_as(self._old):
            return super().visit_tuple_getitem_(op)
        return relax.TupleGetItem(self._new, self.slot[op.index][0])

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(self._old):
            if value.index in self.group_of:  # read again, widened, at the group's matmul
                self._weights[binding.var] = value.index
                return
        elif _is_transpose(value) and value.args[0] in self._weights:
            self._weights[binding.var] = self._weights[value.args[0]]
            return
        elif is_op(value, "relax.matmul") and value.args[1] in self._weights:
            self._bind(binding.var, self._slice(binding.var, value))
            return
        elif is_op(value, "relax.concat") and self._whole(value):
            self._bind(binding.var, self._wide[self._slices[value.args[0].fields[0]][0]])
            return
        super().visit_var_binding_(binding)

    def _slice(self, out: relax.Var, matmul: relax.Call) -> relax.Var:
        member = self._weights[matmul.args[1]]
        group = self.group_of[member]
        if group not in self._wide:
            weight = self.builder_.emit(relax.TupleGetItem(self._new, self.slot[member][0]))
            transposed = self.builder_.emit(relax.op.permute_dims(weight))
            x = self.visit_expr(matmul.args[0])
            wide = relax.op.matmul(x, transposed, out_dtype=matmul.attrs.out_dtype)
            self._wide[group] = self.builder_.emit(wide)
        self._slices[out] = (group, group.index(member))
        _, begin, end = self.slot[member]
        axis = len(out.ty.shape) - 1
        return self.builder_.emit(
            relax.op.strided_slice(self._wide[group], axes=[axis], begin=[begin], end=[end])
        )

    def _whole(self, concat: relax.Call) -> bool:
        """concat of all of one group's outputs, in order, along the last axis."""
        fields = concat.args[0].fields if isinstance(concat.args[0], relax.Tuple) else []
        found = [self._slices.get(f) for f in fields]
        if not found or None in found or len({g for g, _ in found}) != 1:
            return False
        group = found[0][0]
        axis = int(concat.attrs.axis)
        last = axis in (-1, len(fields[0].ty.shape) - 1)
        return last and [m for _, m in found] == list(range(len(group)))

    def _bind(self, var: relax.Var, value: relax.Var) -> None:
        self.set_var_remap(var, value)


def _bindings(func: relax.Function):
    for block in func.body.blocks:
        yield from block.bindings


def _is_transpose(value) -> bool:
    return is_op(value, "relax.permute_dims") and (
        value.attrs.axes is None or [int(a) for a in value.attrs.axes] == [1, 0]
    )

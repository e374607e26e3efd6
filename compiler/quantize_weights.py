"""quantize_weights: weight matmuls become dequantize + matmul over packed weights.

Works on any Relax function whose last parameter is the packed weight tuple (`num_input`
splits runtime inputs from weights, as `nn.Module.export_tvm` emits). With one scheme, a weight
is quantized when it is a 2-D float tensor read by `matmul(x, permute_dims(w))` (a linear
layer) and otherwise only by `take(w, ids, axis=0)`: the tied table of an lm_head, whose
embedding rows are then gathered from the packed parts. A tied head is the largest matmul of a
small model's decode step (SmolLM2-135M: 113 MB of 173 MB as float32), so it must be packed;
one table serves both reads, as in llama.cpp (a float copy for the gather would cost 4 bytes a
value for a gather that reads a few rows per step), in 8 bits where the scheme has fewer
(`tied_table_scheme`). An embedding only gathered stays as it is.

Per-weight schemes (`per_weight`: packed-param index -> scheme) are for weights that come
already packed, such as a GGUF file's llama.cpp blocks: such a weight may also be only
gathered (an untied embedding). A weight that cannot be rewritten stays a float tensor.

The rewritten tuple holds each quantized weight's parts in place of the weight; the pass
returns the new tuple's fields (`weights.PackedField`: source index in the old tuple, part,
shape, dtype, scheme) with the module, so the weight converter produces exactly those tensors.
"""

import json

import tvm
from tvm import relax, te

from relaxlm.tvm_api import tirx

from .quantization import INTERLEAVE, QuantKind, QuantScheme, tied_table_scheme
from .weights import PackedField

# on the dequantize PrimFuncs: {"scheme": the scheme's fields, "k"} as JSON
DEQUANTIZE_ATTR = "relaxlm.dequantize"


def quantize_weights(
    mod: tvm.IRModule,
    scheme: QuantScheme | None,
    compute_dtype: str,
    per_weight: dict[int, QuantScheme] | None = None,
) -> tuple[tvm.IRModule, list[PackedField]]:
    """Replace linear-layer weights by packed parts and a dequantize call.

    Returns the rewritten module and its weight tuple's fields, in order (empty if the module
    has no packed weights).
    """
    per_weight = per_weight or {}
    funcs = {gv: f for gv, f in mod.functions_items() if packed_params(f) is not None}
    if not funcs:
        return mod, []
    fields = list(packed_params(next(iter(funcs.values()))).ty.fields)
    # A weight is packed only if every function uses it, each time in a way we rewrite.
    uses = [_weight_uses(func) for func in funcs.values()]
    schemes: dict[int, QuantScheme] = {}
    for i, ty in enumerate(fields):
        if not _is_float_matrix(ty) or not all(i in u for u in uses):
            continue
        kinds = set().union(*(u[i] for u in uses))
        if i in per_weight and kinds <= {"linear", "gather"}:
            schemes[i] = per_weight[i]
        elif scheme is not None and "linear" in kinds and kinds <= {"linear", "gather"}:
            schemes[i] = tied_table_scheme(scheme) if "gather" in kinds else scheme
    plan, new_fields, layout = [], [], {}
    for i, ty in enumerate(fields):
        layout[i] = []
        if i not in schemes:
            layout[i].append(len(new_fields))
            plan.append(PackedField(i, "", tuple(_shape(ty)), str(ty.dtype)))
            new_fields.append(ty)
            continue
        packed = schemes[i]
        n, k = _shape(ty)
        for part, shape in packed.part_shapes(n, k).items():
            dtype = packed.part_dtype(part, compute_dtype)
            layout[i].append(len(new_fields))
            plan.append(PackedField(i, part, tuple(shape), dtype, packed))
            new_fields.append(relax.TensorType(shape, dtype))
    rewriter = _Rewriter(mod, schemes, compute_dtype, layout, new_fields)
    for gv, func in funcs.items():
        rewriter.rewrite(gv, func)
    return rewriter.builder_.get(), plan


def dequantize_te(scheme: QuantScheme, parts: list[te.Tensor], n, k, dtype: str):
    """The float value of weight element [n, k] from its packed parts (a TE expression)."""
    if scheme.kind == QuantKind.CAST:
        return parts[0][n, k].astype(dtype)
    if scheme.kind == QuantKind.GGUF:
        return _GGUF_TE[scheme.ggml_type](_Block(parts[0], n, k, scheme)).astype(dtype)
    q = parts[0]
    group = k // scheme.group_size
    tile = scheme.row_tile if scheme.tiled(int(q.shape[0])) else 0  # see quantization.py

    def group_value(mins: int):
        """The group's scale (or min); with super-blocks, its integer times the super-block's d
        (or -dmin), side by side with it (quantization.py), in float32: exact."""
        if not scheme.super_group:
            return _row_tiled(parts[1 + mins], n, group, tile).astype(dtype)
        per = 1 if scheme.symmetric else 2
        value = _row_tiled(parts[1], n, group * per + mins, tile)
        multiplier = _row_tiled(parts[2], n, k // scheme.super_group * per + mins, tile)
        return (value.astype("float32") * multiplier.astype("float32")).astype(dtype)

    s = group_value(0)
    if scheme.storage_dtype == "int8":
        if tile:  # 4 consecutive k per 32-bit word, words in row tiles
            kp = int(q.shape[1])
            byte = _tiled_index(n, k // 4, kp // 4, tile) * 4 + k % 4
            code = q[byte // kp, byte % kp].astype(dtype)
        else:
            code = q[n, k].astype(dtype)
    else:
        if scheme.row_tile:  # per 32 k: 4 words of 8 consecutive k, then the high bits' words
            code = _row_code(q, n, k, scheme.bits, tile)
        else:  # interleaved blocks
            lanes = INTERLEAVE // scheme.per_word
            word = q[n, k // INTERLEAVE * lanes + k % lanes]
            shift = (k % INTERLEAVE // lanes * scheme.bits).astype("uint32")
            code = (word >> shift) & tirx.const((1 << scheme.bits) - 1, "uint32")
        code = code.astype("int32").astype(dtype)
        if scheme.symmetric:
            # (code - 8) * s as code * s + (-8 * s): one FMA per weight once LLVM hoists -8 * s
            # out of the group's steps (one vector add fewer in the GEMV's inner loop)
            return code * s + s * tirx.const(-(1 << (scheme.bits - 1)), dtype)
    if scheme.row_tile and not scheme.symmetric:  # GGUF Q4_1 / Q4_K / Q5_1 / Q5_K repacked
        return code * s + group_value(1)
    if not scheme.symmetric:
        code = code - parts[2][n, group]
    return code * s


def _row_code(q: te.Tensor, n, k, bits: int, tile: int) -> tirx.Expr:
    """The unsigned code of weight [n, k] in row-tiled words of 4 to 6 bits (uint32; the layout
    of quantization._pack_row_codes)."""
    base = k // 32 * bits  # words per 32 k: 4 of nibbles, bits - 4 of high bits
    word = _row_tiled(q, n, base + k % 32 // 8, tile)
    code = (word >> (k % 4 * 8 + k % 8 // 4 * 4).astype("uint32")) & tirx.const(15, "uint32")
    planes = bits - 4
    if not planes:
        return code
    t = k % 32 // 4  # the kernel's operand: 4 consecutive k
    plane = _row_tiled(q, n, base + 4 + t * planes // 8, tile)
    high = plane >> (k % 4 * 8 + t * planes % 8).astype("uint32")
    return code | ((high & tirx.const((1 << planes) - 1, "uint32")) << tirx.const(4, "uint32"))


def _row_tiled(part: te.Tensor, row, col, tile: int) -> tirx.Expr:
    """part[row, col] of a part stored in tiles of `tile` rows (tile-major, quantization.py);
    tile 0: rows in order."""
    if not tile:
        return part[row, col]
    cols = int(part.shape[1])
    flat = _tiled_index(row, col, cols, tile)
    return part[flat // cols, flat % cols]


def _tiled_index(row, col, cols: int, tile: int):
    """Flat index of element [row, col] of an [N, cols] array stored in tiles of `tile` rows."""
    return (row // tile * cols + col) * tile + row % tile


# -- GGUF blocks: the numpy reference's arithmetic (quantization.py) as TE, in float32 ----


class _Block:
    """Element k of row n of raw GGUF rows: its block's bytes and its index e in the block."""

    def __init__(self, raw: te.Tensor, n, k, scheme: QuantScheme):
        self.raw, self.n = raw, n
        self.e = k % scheme.group_size
        self.base = k // scheme.group_size * scheme.block_bytes

    def u8(self, offset) -> tirx.Expr:
        return self.raw[self.n, self.base + offset].astype("int32")

    def i8(self, offset) -> tirx.Expr:
        return tirx.reinterpret("int8", self.raw[self.n, self.base + offset]).astype("float32")

    def f16(self, offset) -> tirx.Expr:
        """float32 of the little-endian fp16 at `offset` (a reinterpret, as llama.cpp reads it)."""
        lo = self.raw[self.n, self.base + offset].astype("uint16")
        hi = self.raw[self.n, self.base + offset + 1].astype("uint16")
        bits = lo | (hi << tirx.const(8, "uint16"))
        return tirx.reinterpret("float16", bits).astype("float32")

    def nibble(self, qs: int, i, high) -> tirx.Expr:
        """Low (high = 0) or high (high = 1) nibble of byte qs + i, as int32."""
        return (self.u8(qs + i) >> (high * 4)) & 15


def _f32(x) -> tirx.Expr:
    return x.astype("float32")


def _q8_0(b: _Block):
    return b.i8(2 + b.e) * b.f16(0)


def _q4_0(b: _Block):
    return _f32(b.nibble(2, b.e % 16, b.e // 16) - 8) * b.f16(0)


def _q4_1(b: _Block):
    return _f32(b.nibble(4, b.e % 16, b.e // 16)) * b.f16(0) + b.f16(2)


def _bit5(b: _Block, qh: int):
    """Bit e of the block's little-endian uint32 qh, as 0 or 16."""
    return ((b.u8(qh + b.e // 8) >> (b.e % 8)) & 1) * 16


def _q5_0(b: _Block):
    return _f32(b.nibble(6, b.e % 16, b.e // 16) + _bit5(b, 2) - 16) * b.f16(0)


def _q5_1(b: _Block):
    return _f32(b.nibble(8, b.e % 16, b.e // 16) + _bit5(b, 4)) * b.f16(0) + b.f16(2)


def _k_quant(b: _Block, qs: int, qh: int | None):
    """Q4_K / Q5_K: sub-block j = 2c + half takes nibble `half` of qs[32c + l]."""
    c, half, lane = b.e // 64, b.e % 64 // 32, b.e % 32
    j = 2 * c + half
    q = b.nibble(qs, 32 * c + lane, half)
    if qh is not None:
        q = q + ((b.u8(qh + lane) >> j) & 1) * 16
    # get_scale_min_k4, reading only bytes lo, lo + 4, lo + 8 (always in the block)
    lo = j % 4
    s0, s4, s8 = b.u8(4 + lo), b.u8(8 + lo), b.u8(12 + lo)
    first = j < 4
    sc = tirx.Select(first, s0 & 63, (s8 & 15) | ((s0 >> 6) << 4))
    mn = tirx.Select(first, s4 & 63, (s8 >> 4) | ((s4 >> 6) << 4))
    return b.f16(0) * _f32(sc) * _f32(q) - b.f16(2) * _f32(mn)


def _q4_k(b: _Block):
    return _k_quant(b, 16, None)


def _q5_k(b: _Block):
    return _k_quant(b, 48, 16)


def _q6_k(b: _Block):
    h, g, lane = b.e // 128, b.e % 128 // 32, b.e % 32
    low = b.nibble(0, 64 * h + lane + 32 * (g % 2), g // 2)
    high = (b.u8(128 + 32 * h + lane) >> (2 * g)) & 3
    q = _f32((low | (high << 4)) - 32)
    return b.f16(208) * b.i8(192 + 8 * h + lane // 16 + 2 * g) * q


def _two_bit_code(b: _Block, qs: int):
    """Q2_K / Q3_K: value 128h + 32j + 16s + l is bits 2j of qs[32h + 16s + l] (as int32)."""
    h, j, lane = b.e // 128, b.e % 128 // 32, b.e % 32
    return (b.u8(qs + 32 * h + lane) >> (2 * j)) & 3


def _q2_k(b: _Block):
    scales = b.u8(b.e // 16)
    q = _f32(_two_bit_code(b, 16))
    return b.f16(80) * _f32(scales & 15) * q - b.f16(82) * _f32(scales >> 4)


def _q3_k(b: _Block):
    h, j, lane = b.e // 128, b.e % 128 // 32, b.e % 32
    high = (b.u8(lane) >> (4 * h + j)) & 1  # hmask bit clear: the code is 4 lower
    q = _f32(_two_bit_code(b, 32) - 4 * (1 - high))
    i = b.e // 16  # scale i: a nibble of byte i % 8, 2 high bits of byte 8 + i % 4
    low = (b.u8(96 + i % 8) >> (i // 8 * 4)) & 15
    top = (b.u8(104 + i % 4) >> (i // 4 * 2)) & 3
    sc = _f32((low | (top << 4)) - 32)
    return b.f16(108) * sc * q


_GGUF_TE = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q3_K": _q3_k,
    "Q2_K": _q2_k,
}


def packed_params(func) -> relax.Var | None:
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


def static_shape(ty) -> list[int] | None:
    """A tensor type's shape as ints, or None if it is not a tensor of static shape."""
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    if not all(isinstance(d, tirx.IntImm) for d in ty.shape):
        return None
    return _shape(ty)


def _weight_uses(func: relax.Function) -> dict[int, set[str]]:
    """Packed-param index -> how `func` uses it: "linear" (matmul(x, permute_dims(w))),
    "gather" (take(w, ids, axis=0)) or "other"; unused params are absent."""
    params = packed_params(func)
    index: dict[relax.Var, int] = {}
    uses: dict[relax.Var, list[tuple[relax.Var, relax.Call, int]]] = {}
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
    kinds: dict[int, set[str]] = {}
    for var, i in index.items():
        for out, call, pos in uses.get(var, []):
            kinds.setdefault(i, set()).add(_use_kind(out, call, pos, uses))
    return kinds


def _use_kind(out: relax.Var, call, pos: int, uses: dict) -> str:
    if is_op(call, "relax.take") and pos == 0 and call.attrs.axis is not None:
        return "gather" if int(call.attrs.axis) == 0 else "other"
    transposed = is_op(call, "relax.permute_dims") and (
        call.attrs.axes is None or [int(a) for a in call.attrs.axes] == [1, 0]
    )
    consumers = uses.get(out, [])
    if (
        transposed
        and consumers
        and all(is_op(c, "relax.matmul") and p == 1 for _, c, p in consumers)
    ):
        return "linear"
    return "other"


def is_op(call, name: str) -> bool:
    return isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get(name))


def linear_weight(builder: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    """w where `call` is a linear layer's `matmul(x, permute_dims(w))`, w 2-D [n, k], else None
    (`builder` looks up what a variable is bound to)."""
    if not is_op(call, "relax.matmul"):
        return None
    rhs = call.args[1]
    transposed = builder.lookup_binding(rhs) if isinstance(rhs, relax.Var) else rhs
    if not is_op(transposed, "relax.permute_dims"):
        return None
    w, axes = transposed.args[0], transposed.attrs.axes
    if w.ty.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
        return None
    return w


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, schemes, compute_dtype, layout, new_fields):
        super().__init__(mod)
        self.schemes = schemes
        self.compute_dtype = compute_dtype
        self.layout = layout
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
        if op.index not in self.schemes:
            return relax.TupleGetItem(self._new, slots[0])
        scheme = self.schemes[op.index]
        parts = [self.builder_.emit(relax.TupleGetItem(self._new, j)) for j in slots]
        n, k = _shape(self._old.ty.fields[op.index])
        return self.builder_.call_te(
            _dequantize_compute(scheme, n, k, self.compute_dtype),
            *parts,
            primfunc_name_hint=f"dequantize_{scheme.name.replace('-', '_')}",
            primfunc_attrs={DEQUANTIZE_ATTR: json.dumps({"scheme": scheme.to_dict(), "k": k})},
        )


def _dequantize_compute(scheme: QuantScheme, n: int, k: int, dtype: str):
    def compute(*parts):
        return te.compute(
            (n, k), lambda i, j: dequantize_te(scheme, list(parts), i, j, dtype), name="dequantize"
        )

    return compute

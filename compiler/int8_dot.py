"""Int8 dot products for `q4-a8` on CPUs with AVX-512 VNNI: activations quantized at run time.

A weight-only q4 GEMV unpacks every weight to float before its FMA, which costs more than
reading it (~24 GB/s per core here). Like llama.cpp's Q4_0 x Q8_0 dot, `q4-a8` quantizes the
activations once per matmul to int8 (one scale per group of 32, `scale = max|x| / 127`,
`code = round(x / scale)`) and multiplies 4-bit codes by int8 codes with `vpdpbusd` (64
multiply-adds per instruction into int32). The result equals `dequantized weights @
dequantized int8 activations` up to float rounding of the scales.

The kernel puts weight rows in vector lanes: `q4-a8` stores weights in tiles of TILE = 16 rows
(quantization.py, `row_tile`), so one 64-byte load holds 8 consecutive k of each of the 16 rows
(per row, byte e: k = 8o + e in the low nibble, 8o + 4 + e in the high one). A mask and a shift
give two `vpdpbusd` operands, each multiplied by 4 activation codes broadcast to every lane;
after a group's 8 of them each lane holds its row's whole group dot, which one convert and one
FMA scale into the row's float sum. No horizontal sums, one store of 16 outputs, and a tile's
weights stream as one run of memory. The nibbles are unsigned: a per-group correction
-8 * (sum of the group's activation codes) starts each lane's int32 sum.
"""

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import codegen

GROUP = 32  # q4 and the activations: one scale per 32 values along K
TILE = 16  # weight rows per tile: one 32-bit lane each
MATRIX_ROWS = 4  # rows of x per step in prefill: each unpacked weight vector serves them all
_NIBBLES = 0x0F0F0F0F


def has_int8_dot(target: tvm.target.Target) -> bool:
    """Whether the kernels here compile for `target`: an LLVM CPU with AVX-512 VNNI."""
    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512vnni", target))


def supports(n: int, k_padded: int) -> bool:
    """Whether a q4-a8 weight [n, k] (K padded to whole groups) is stored in row tiles."""
    return n % TILE == 0 and k_padded % GROUP == 0


def _dpbusd(acc, unsigned, signed):
    return T.call_llvm_pure_intrin(
        "int32x16",
        "llvm.x86.avx512.vpdpbusd.512",
        acc,
        T.reinterpret("int8x64", unsigned),
        T.reinterpret("int8x64", signed),
    )


def _codes4(codes, i, c):
    """Activation codes c .. c + 3 of row i as one int32, in all 16 lanes."""
    return T.broadcast(T.reinterpret("int32", codes[i, T.ramp(c, 1, 4)]), TILE)


def q4_int8_linear(
    n: int, k: int, k_padded: int, scale_dtype: str = "float32", residual: bool = False
) -> tirx.PrimFunc:
    """out[b, s, n] = sum_k dequantized w[n, k] * int8-rounded x[b, s, k] (+ residual[b, s, n]),
    in one kernel: the rows of x are quantized first, then the dot products run parallel over
    tiles of TILE weight rows, MATRIX_ROWS rows of x at a time when there are that many."""
    groups = k_padded // GROUP
    words = k_padded // 8  # per weight row

    @T.macro(hygienic=False)
    def body(var_x, w, w_scale, res, out, batch, seq, n, k, k_padded, groups, words, scale_dtype):
        x = T.match_buffer(var_x, (batch, seq, k), "float32")
        w_flat = T.decl_buffer((n * words,), "uint32", data=w.data)
        s_flat = T.decl_buffer((n * groups,), scale_dtype, data=w_scale.data)
        rows = T.meta_var(batch * seq)
        codes = T.alloc_buffer((rows, k_padded), "int8")
        correction = T.alloc_buffer((rows, groups), "int32")
        scale = T.alloc_buffer((rows, groups), "float32")
        parts = T.meta_var((w_flat, s_flat, codes, correction, scale, res, out, groups, words))
        if rows < MATRIX_ROWS:  # decode: a parallel launch would cost more than the rows
            for i in range(rows):
                _quantize_row(x, i // seq, i % seq, k, groups, codes, correction, scale, i)
            for tile in T.parallel(n // TILE):
                for i in range(rows):
                    _tile_rows(*parts, seq, tile, i, 1, i)
        else:
            for i in T.parallel(rows):
                _quantize_row(x, i // seq, i % seq, k, groups, codes, correction, scale, i)
            # MATRIX_ROWS rows of x share each unpacked weight vector; a last, partial step
            # repeats the last row (the same values written twice).
            for tile in T.parallel(n // TILE):
                for i in range((rows + MATRIX_ROWS - 1) // MATRIX_ROWS):
                    _tile_rows(*parts, seq, tile, i * MATRIX_ROWS, MATRIX_ROWS, rows - 1)

    if residual:

        @T.prim_func(private=True)
        def with_residual(
            var_x: T.handle,
            w: T.Buffer((n, words), "uint32"),
            w_scale: T.Buffer((n, groups), scale_dtype),
            var_residual: T.handle,
            var_out: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            batch, seq = T.int64(), T.int64()
            res = T.match_buffer(var_residual, (batch, seq, n), "float32")
            out = T.match_buffer(var_out, (batch, seq, n), "float32")
            body(
                var_x, w, w_scale, res, out, batch, seq, n, k, k_padded, groups, words, scale_dtype
            )

        return with_residual

    @T.prim_func(private=True)
    def kernel(
        var_x: T.handle,
        w: T.Buffer((n, words), "uint32"),
        w_scale: T.Buffer((n, groups), scale_dtype),
        var_out: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        batch, seq = T.int64(), T.int64()
        out = T.match_buffer(var_out, (batch, seq, n), "float32")
        body(var_x, w, w_scale, None, out, batch, seq, n, k, k_padded, groups, words, scale_dtype)

    return kernel


@T.macro(hygienic=False)
def _tile_rows(
    w, w_scale, codes, correction, scale, res, out, groups, words, seq, tile, first, count, last
):
    """Outputs [tile * TILE, +TILE) of rows first .. first + count - 1 (capped at `last`)."""
    # default scope: small stack arrays that LLVM keeps in registers; row j's lanes at j * TILE
    acc = T.alloc_buffer((count * TILE,), "float32")
    dot = T.alloc_buffer((count * TILE,), "int32")
    mask = T.meta_var(T.broadcast(T.uint32(_NIBBLES), TILE))
    for j in T.unroll(count):
        acc[_lanes_of(j)] = T.broadcast(T.float32(0), TILE)
    for g in range(groups):
        for j in T.unroll(count):
            dot[_lanes_of(j)] = T.broadcast(correction[T.min(first + j, last), g], TILE)
        for o in T.unroll(GROUP // 8):
            # word o of the group for the tile's 16 rows: two vpdpbusd operands, shared by all j
            wv = T.meta_var(w[T.ramp(((tile * words) + g * 4 + o) * TILE, 1, TILE)])
            low = T.meta_var(T.bitwise_and(wv, mask))
            high = T.meta_var(
                T.bitwise_and(T.shift_right(wv, T.broadcast(T.uint32(4), TILE)), mask)
            )
            for j in T.unroll(count):
                i = T.meta_var(T.min(first + j, last))
                dot[_lanes_of(j)] = _dpbusd(
                    _dpbusd(dot[_lanes_of(j)], low, _codes4(codes, i, g * GROUP + o * 8)),
                    high,
                    _codes4(codes, i, g * GROUP + o * 8 + 4),
                )
        w_scales = T.meta_var(
            T.Cast("float32x16", w_scale[T.ramp((tile * groups + g) * TILE, 1, TILE)])
        )
        for j in T.unroll(count):
            x_scale = T.meta_var(T.broadcast(scale[T.min(first + j, last), g], TILE))
            acc[_lanes_of(j)] = acc[_lanes_of(j)] + T.Cast("float32x16", dot[_lanes_of(j)]) * (
                w_scales * x_scale
            )
    for j in T.unroll(count):
        i = T.meta_var(T.min(first + j, last))
        cols = T.meta_var(T.ramp(tile * TILE, 1, TILE))
        if res is None:
            out[i // seq, i % seq, cols] = acc[_lanes_of(j)]
        else:
            out[i // seq, i % seq, cols] = acc[_lanes_of(j)] + res[i // seq, i % seq, cols]


def _lanes_of(j):
    """Row j's TILE lanes in the accumulators."""
    return T.ramp(j * TILE, 1, TILE)


@T.macro(hygienic=False)
def _quantize_row(x, bi, si, k, groups, codes, correction, scale, i):
    """Row i of x as int8 codes per group of 32 (zero past k), with each group's scale and
    correction -8 * (sum of its codes)."""
    for g in range(groups):
        amax = T.alloc_buffer((1,), "float32")
        total = T.alloc_buffer((1,), "int32")
        amax[0] = T.float32(0)
        for e in range(GROUP):
            if g * GROUP + e < k:
                amax[0] = T.max(amax[0], T.abs(x[bi, si, g * GROUP + e]))
        d = T.meta_var(amax[0] / T.float32(127))
        total[0] = 0
        for e in range(GROUP):
            c = T.meta_var(g * GROUP + e)
            v = T.meta_var(T.if_then_else(c < k, x[bi, si, T.min(c, k - 1)], T.float32(0)))
            codes[i, c] = T.Cast("int8", T.Select(d > T.float32(0), T.round(v / d), T.float32(0)))
            total[0] = total[0] + T.Cast("int32", codes[i, c])
        correction[i, g] = -8 * total[0]
        scale[i, g] = d

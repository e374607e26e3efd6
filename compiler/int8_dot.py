"""Int8 dot products for `q4-a8` on CPUs with AVX-512 VNNI: activations quantized at run time.

A weight-only q4 GEMV unpacks every weight to float before its FMA, which costs more than
reading it (~24 GB/s per core here). Like llama.cpp's Q4_0 x Q8_0 dot, `q4-a8` quantizes the
activations once per matmul to int8 (one scale per group of 32, `scale = max|x| / 127`,
`code = round(x / scale)`) and multiplies 4-bit codes by int8 codes with `vpdpbusd`: 64
multiply-adds per instruction into int32, then one float FMA per 128 weights applies both
groups' scales. The weights are q4's, unchanged (quantization.py's layout); the result equals
`dequantized weights @ dequantized int8 activations` up to float rounding of the scales.

The 4-bit layout holds, in byte t of word l of a 128-wide block b, the codes of
k = 128b + 32t + l (low nibble) and k + 16 (high nibble): the four bytes of a word belong to
four groups, and `vpdpbusd` sums the bytes of each 32-bit lane. One byte shuffle (a 4x4
transpose in each 128-bit lane) puts four bytes of one group in each lane: lane L = 4q + t
then holds group t at k = 128b + 32t + 4q + i (i = 0..3; +16 for the high nibbles). The
activations are written in that order (`_quantize_row`), with, per lane, the
correction -8 * (sum of its eight codes) that turns the unsigned nibbles into code - 8, and
the activation scale of the lane's group.
"""

import functools
import operator

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import codegen

from .quantization import INTERLEAVE

GROUP = 32  # q4 and the activations: one scale per 32 values along K
LANES = 16  # 32-bit lanes of an AVX-512 register
ROWS = 4  # weight rows per step: independent accumulators, activation loads shared
MATRIX_ROWS = 2  # rows of x per step in prefill: each unpacked weight vector serves them all
_NIBBLES = 0x0F0F0F0F
# Byte p of the shuffled vector takes byte SHUFFLE[p]: a 4x4 byte transpose in each 16 bytes.
_SHUFFLE = [16 * (p // 16) + 4 * (p % 4) + p % 16 // 4 for p in range(64)]


def has_int8_dot(target: tvm.target.Target) -> bool:
    """Whether the kernels here compile for `target`: an LLVM CPU with AVX-512 VNNI."""
    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512vnni", target))


def supports(n: int, k_padded: int) -> bool:
    """Whether a q4 weight [n, k] (K padded to whole blocks) fits the kernel's tiling."""
    return n % ROWS == 0 and k_padded % INTERLEAVE == 0


def _dpbusd(acc, unsigned, signed):
    return T.call_llvm_pure_intrin(
        "int32x16",
        "llvm.x86.avx512.vpdpbusd.512",
        acc,
        T.reinterpret("int8x64", unsigned),
        T.reinterpret("int8x64", signed),
    )


def _block_dot(words, correction, low_codes, high_codes):
    """int32 lanes: sum over the block's 128 k of (nibble - 8) * code, four lanes per group."""
    shuffled = T.reinterpret("uint32x16", T.Shuffle([T.reinterpret("int8x64", words)], _SHUFFLE))
    mask = T.broadcast(T.uint32(_NIBBLES), LANES)
    low = T.bitwise_and(shuffled, mask)
    high = T.bitwise_and(T.shift_right(shuffled, T.broadcast(T.uint32(4), LANES)), mask)
    return _dpbusd(_dpbusd(correction, low, low_codes), high, high_codes)


def _sum(buffer, index: tuple, offsets, dtype: str = "float32"):
    """buffer[*index[:-1], index[-1] + o] summed over `offsets` in `dtype`, as one expression:
    TVMScript makes an accumulator a mutable local, which a parallel loop body allocates from
    the workspace on every iteration."""
    *outer, last = index
    terms = (buffer[(*outer, last + o)].astype(dtype) for o in offsets)
    return functools.reduce(operator.add, terms)


def _four_times(v):
    """The block's 4 group scales repeated to 16 lanes: lane L takes group L % 4."""
    return T.Shuffle([v, v, v, v], list(range(LANES)))


def q4_int8_linear(
    n: int, k: int, k_padded: int, scale_dtype: str = "float32", residual: bool = False
) -> tirx.PrimFunc:
    """out[b, s, n] = sum_k dequantized w[n, k] * int8-rounded x[b, s, k] (+ residual[b, s, n]),
    in one kernel: the rows of x are quantized first, then the dot products run parallel over
    tiles of ROWS weight rows, MATRIX_ROWS rows of x at a time when there are that many."""
    blocks = k_padded // INTERLEAVE

    @T.macro(hygienic=False)
    def body(var_x, w, w_scale, res, out, batch, seq, n, k, k_padded, blocks):
        x = T.match_buffer(var_x, (batch, seq, k), "float32")
        rows = T.meta_var(batch * seq)
        codes = T.alloc_buffer((rows, k_padded), "int8")
        correction = T.alloc_buffer((rows, blocks * LANES), "int32")
        scale = T.alloc_buffer((rows, blocks * LANES), "float32")
        parts = T.meta_var((w, w_scale, codes, correction, scale, res, out))
        if rows < MATRIX_ROWS:  # decode: a parallel launch would cost more than the rows
            for i in range(rows):
                _quantize_row(x, i // seq, i % seq, k, blocks, codes, correction, scale, i)
            for tile in T.parallel(n // ROWS):
                for i in range(rows):
                    _tile_rows(*parts, seq, tile, i, 1, i)
        else:
            for i in T.parallel(rows):
                _quantize_row(x, i // seq, i % seq, k, blocks, codes, correction, scale, i)
            # MATRIX_ROWS rows of x share each unpacked weight vector; a last, partial group
            # repeats the last row (the same values written twice).
            for tile in T.parallel(n // ROWS):
                for i in range((rows + MATRIX_ROWS - 1) // MATRIX_ROWS):
                    _tile_rows(*parts, seq, tile, i * MATRIX_ROWS, MATRIX_ROWS, rows - 1)

    if residual:

        @T.prim_func(private=True)
        def with_residual(
            var_x: T.handle,
            w: T.Buffer((n, blocks * 16), "uint32"),
            w_scale: T.Buffer((n, blocks * 4), scale_dtype),
            var_residual: T.handle,
            var_out: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            batch, seq = T.int64(), T.int64()
            res = T.match_buffer(var_residual, (batch, seq, n), "float32")
            out = T.match_buffer(var_out, (batch, seq, n), "float32")
            body(var_x, w, w_scale, res, out, batch, seq, n, k, k_padded, blocks)

        return with_residual

    @T.prim_func(private=True)
    def kernel(
        var_x: T.handle,
        w: T.Buffer((n, blocks * 16), "uint32"),
        w_scale: T.Buffer((n, blocks * 4), scale_dtype),
        var_out: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        batch, seq = T.int64(), T.int64()
        out = T.match_buffer(var_out, (batch, seq, n), "float32")
        body(var_x, w, w_scale, None, out, batch, seq, n, k, k_padded, blocks)

    return kernel


@T.macro(hygienic=False)
def _tile_rows(w, w_scale, codes, correction, scale, res, out, seq, tile, first, count, last):
    """Outputs [tile * ROWS, +ROWS) of rows first .. first + count - 1 (capped at `last`)."""
    # default scope: a small stack array that LLVM keeps in registers
    acc = T.alloc_buffer((count * ROWS * LANES,), "float32")
    for a in T.unroll(count * ROWS):
        acc[T.ramp(a * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
    for b in range(codes.shape[1] // INTERLEAVE):
        for j in T.unroll(count):
            for r in T.unroll(ROWS):
                i = T.meta_var(T.min(first + j, last))
                a = T.meta_var(T.ramp((j * ROWS + r) * LANES, 1, LANES))
                acc[a] = acc[a] + T.Cast(
                    "float32x16",
                    _block_dot(
                        w[tile * ROWS + r, T.ramp(b * 16, 1, 16)],
                        correction[i, T.ramp(b * LANES, 1, LANES)],
                        codes[i, T.ramp(b * INTERLEAVE, 1, 64)],
                        codes[i, T.ramp(b * INTERLEAVE + 64, 1, 64)],
                    ),
                ) * (
                    _four_times(T.Cast("float32x4", w_scale[tile * ROWS + r, T.ramp(b * 4, 1, 4)]))
                    * scale[i, T.ramp(b * LANES, 1, LANES)]
                )
    for j, r in T.grid(count, ROWS):
        i = T.meta_var(T.min(first + j, last))
        total = T.meta_var(_sum(acc, ((j * ROWS + r) * LANES,), range(LANES)))
        if res is None:
            out[i // seq, i % seq, tile * ROWS + r] = total
        else:
            out[i // seq, i % seq, tile * ROWS + r] = (
                total + res[i // seq, i % seq, tile * ROWS + r]
            )


@T.macro(hygienic=False)
def _quantize_row(x, bi, si, k, blocks, codes, correction, scale, i):
    """Row i of x in the kernel's order: codes, per-lane corrections and scales."""
    for b in range(blocks):
        amax = T.alloc_buffer((4,), "float32")
        for t in range(4):
            amax[t] = T.float32(0)
            for j in range(GROUP):
                c = T.meta_var(b * INTERLEAVE + t * GROUP + j)
                if c < k:
                    amax[t] = T.max(amax[t], T.abs(x[bi, si, c]))
        for h, q, t, e in T.grid(2, 4, 4, 4):
            # position 128b + 64h + 16q + 4t + e  <-  k = 128b + 32t + 16h + 4q + e
            c = T.meta_var(b * INTERLEAVE + t * GROUP + h * 16 + q * 4 + e)
            d = T.meta_var(amax[t] / T.float32(127))
            v = T.meta_var(T.if_then_else(c < k, x[bi, si, T.min(c, k - 1)], T.float32(0)))
            codes[i, b * INTERLEAVE + h * 64 + q * 16 + t * 4 + e] = T.Cast(
                "int8", T.Select(d > T.float32(0), T.round(v / d), T.float32(0))
            )
        for lane in range(LANES):
            # the lane's 4 low-nibble codes, and its 4 high-nibble codes 64 bytes on
            correction[i, b * LANES + lane] = -8 * _sum(
                codes, (i, b * INTERLEAVE + lane * 4), [0, 1, 2, 3, 64, 65, 66, 67], "int32"
            )
            scale[i, b * LANES + lane] = amax[lane % 4] / T.float32(127)

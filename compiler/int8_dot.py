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
activations are written in that order by `quantize_activations`, with, per lane, the
correction -8 * (sum of its eight codes) that turns the unsigned nibbles into code - 8, and
the activation scale of the lane's group.
"""

import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.target import codegen

from .quantization import INTERLEAVE

GROUP = 32  # q4 and the activations: one scale per 32 values along K
LANES = 16  # 32-bit lanes of an AVX-512 register
ROWS = 4  # weight rows per step: independent accumulators, activation loads shared
_NIBBLES = 0x0F0F0F0F
# Byte p of the shuffled vector takes byte SHUFFLE[p]: a 4x4 byte transpose in each 16 bytes.
_SHUFFLE = [16 * (p // 16) + 4 * (p % 4) + p % 16 // 4 for p in range(64)]


def has_int8_dot(target: tvm.target.Target) -> bool:
    """Whether the kernels here compile for `target`: an LLVM CPU with AVX-512 VNNI."""
    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512vnni", target))


def supports(n: int, k_padded: int) -> bool:
    """Whether a q4 weight [n, k] (K padded to whole blocks) fits the kernel's tiling."""
    return n % ROWS == 0 and k_padded % INTERLEAVE == 0


def quantize_activations_te(x: te.Tensor, k: int, k_padded: int):
    """x [M, k] float32 -> (codes int8 [M, Kp] in the kernel's order, correction int32
    [M, Kp/8], scale float32 [M, Kp/8]), one correction and scale per 32-bit lane."""
    m = x.shape[0]

    def value(i, c):
        return tirx.if_then_else(c < k, x[i, c], tirx.const(0, "float32"))

    j = te.reduce_axis((0, GROUP), name="j")
    amax = te.compute(
        (m, k_padded // GROUP),
        lambda i, g: te.max(tirx.abs(value(i, g * GROUP + j)), axis=j),
        name="amax",
    )

    def code(i, p):
        # position p = 128b + 64h + 16q + 4t + i  <-  k = 128b + 32t + 16h + 4q + i
        b, h, q, t, e = p // 128, p % 128 // 64, p % 64 // 16, p % 16 // 4, p % 4
        c = b * 128 + t * 32 + h * 16 + q * 4 + e
        scale = amax[i, c // GROUP] / tirx.const(127, "float32")
        rounded = tirx.round(value(i, c) / scale)
        return tirx.Select(scale > 0, rounded, tirx.const(0, "float32")).astype("int8")

    codes = te.compute((m, k_padded), code, name="codes")
    r = te.reduce_axis((0, 8), name="r")  # a lane's 4 low-nibble and 4 high-nibble codes
    correction = te.compute(
        (m, k_padded // 8),
        lambda i, lane: te.sum(
            codes[i, lane // LANES * 128 + r // 4 * 64 + lane % LANES * 4 + r % 4].astype("int32")
            * -8,
            axis=r,
        ),
        name="correction",
    )
    scale = te.compute(
        (m, k_padded // 8),
        lambda i, lane: amax[i, lane // LANES * 4 + lane % 4] / tirx.const(127, "float32"),
        name="lane_scale",
    )
    return codes, correction, scale


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


def _four_times(v):
    """The block's 4 group scales repeated to 16 lanes: lane L takes group L % 4."""
    return T.Shuffle([v, v, v, v], list(range(LANES)))


def q4_int8_matmul(n: int, k_padded: int) -> tirx.PrimFunc:
    """out[m, n] = sum_k dequantized w[n, k] * dequantized codes[m, k], parallel over n."""
    blocks = k_padded // INTERLEAVE
    words = INTERLEAVE // 8  # 16 words of 8 nibbles per block

    @T.prim_func(private=True)
    def kernel(
        var_codes: T.handle,
        var_correction: T.handle,
        var_scale: T.handle,
        w: T.Buffer((n, blocks * words), "uint32"),
        w_scale: T.Buffer((n, blocks * 4), "float32"),
        var_out: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        m = T.int64()
        codes = T.match_buffer(var_codes, (m, k_padded), "int8")
        correction = T.match_buffer(var_correction, (m, blocks * LANES), "int32")
        scale = T.match_buffer(var_scale, (m, blocks * LANES), "float32")
        out = T.match_buffer(var_out, (m, n), "float32")
        for tile in T.parallel(n // ROWS):
            for i in range(m):
                # default scope: a small stack array that LLVM keeps in registers
                acc = T.alloc_buffer((ROWS * LANES,), "float32")
                for r in T.unroll(ROWS):
                    acc[T.ramp(r * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                for b in range(blocks):
                    for r in T.unroll(ROWS):
                        acc[T.ramp(r * LANES, 1, LANES)] = acc[
                            T.ramp(r * LANES, 1, LANES)
                        ] + T.Cast(
                            "float32x16",
                            _block_dot(
                                w[tile * ROWS + r, T.ramp(b * words, 1, words)],
                                correction[i, T.ramp(b * LANES, 1, LANES)],
                                codes[i, T.ramp(b * 128, 1, 64)],
                                codes[i, T.ramp(b * 128 + 64, 1, 64)],
                            ),
                        ) * (
                            _four_times(w_scale[tile * ROWS + r, T.ramp(b * 4, 1, 4)])
                            * scale[i, T.ramp(b * LANES, 1, LANES)]
                        )
                for r in T.unroll(ROWS):
                    out[i, tile * ROWS + r] = T.float32(0)
                    for lane in range(LANES):
                        out[i, tile * ROWS + r] = out[i, tile * ROWS + r] + acc[r * LANES + lane]

    return kernel

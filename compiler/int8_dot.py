"""Int8 dot products for 4- to 8-bit weights on x86 CPUs (AVX-512 VNNI, AVX-VNNI, AVX-512BW or
AVX2): activations quantized at run time.

A weight-only GEMV unpacks every weight to float before its FMA, which costs more than reading
it (~24 GB/s per core here for q4). Like llama.cpp's Q4_0 x Q8_0 dot, these kernels quantize
the activations once per matmul to integers (one scale per group of 32, `scale = max|x| /
levels`, `code = round(x / scale)`) and multiply weight codes by int8 codes with `vpdpbusd` (64
multiply-adds per instruction into int32). The result equals `dequantized weights @ dequantized
integer activations` up to float rounding of the scales.

How finely the activations are rounded is the scheme's choice (`PIECES`): `q4-a8` rounds them
to int8, as Q4_0 does (one `vpdpbusd` per 4 weights x 16 rows); `q4` and `q8` to 22-bit
integers, split into three int8 pieces (code = p0 + 256 p1 + 65536 p2), each its own
`vpdpbusd` into its own int32 sum, added up once per group. Their rounding (2^-22 of the
group's largest value) is far below what float32 sums of the same products differ by, so `q4`
and `q8` stay exact against their dequantized weights (1e-4 in a model's logits) at three
times q4-a8's integer work, still a fraction of the float kernel's.

The kernel puts weight rows in vector lanes: the weights are stored in tiles of TILE = 16 rows
(quantization.py, `row_tile`), so one 64-byte load holds one 32-bit word of each of the 16
rows: 8 consecutive k of 4 bits (byte e: k = 8o + e in the low nibble, 8o + 4 + e in the high
one), split by a mask and a shift into two `vpdpbusd` operands; or 4 consecutive k of 8 bits,
one operand; or, for 5- and 6-bit codes (GGUF's Q5_K and Q6_K), the nibbles with the high
bits of one or two more words per group ORed in at bit 4 of each byte. Each operand is
multiplied by 4 activation codes broadcast to every lane; after a group each lane holds its
row's whole group dot, which one convert and one FMA scale into the row's float sum. No
horizontal sums, one store of 16 outputs, and a tile's weights stream as one run of memory,
prefetched ahead. `vpdpbusd` takes its weights unsigned: 4-bit codes are stored so (w + 8),
6-bit ones w + 32, int8 weights get their sign bit flipped (w + 128); a per-group correction
-bias * (sum of the group's activation codes) starts the int32 sums.

`vpdpbusd` is the target's (`Int8Dot`, from its LLVM features; `cpu:haswell` names another
CPU's): AVX-512 VNNI's 512-bit one; AVX-VNNI's 256-bit VEX one on each half of the 16 lanes;
without VNNI (AVX-512BW, AVX2 on halves) `vpmaddubsw` (pairs of u8 * s8 into int16, saturating)
then `vpmaddwd` by ones (pairs into int32), exact for the operands here (see `_dpbusd`), so
every flavour's kernel gives the same bits. An AVX2 core does a quarter of VNNI's multiply-adds
per instruction (half the width, two instructions).
"""

from enum import StrEnum

import tvm
from tvm.target import codegen

from relaxlm.tvm_api import T, tirx

from .quantization import Activations

GROUP = 32  # the weights and the activations: one scale per 32 values along K
TILE = 16  # weight rows per tile: one 32-bit lane each
MATRIX_ROWS = 4  # rows of x per step in prefill: each unpacked weight vector serves them all
# Groups ahead that each group prefetches (8 KiB of one q4 tile's stream). From DRAM a
# 65536 x 4096 q4 GEMV took 1.45-1.55 ms with it, 2.1-2.8 ms without.
PREFETCH = 32
_NIBBLES = 0x0F0F0F0F
_SIGN_BITS = 0x80808080
# The scheme's `activations` -> (int8 pieces per code, largest code). A group's int32 sums stay
# in range: the top piece's sum is converted to float on its own, and the lower two pieces
# (16 bits) times 32 weights below 128 in magnitude stay under 2^31.
PIECES = {Activations.INT8: (1, 127), Activations.INT22: (3, (1 << 21) - 1)}


class Int8Dot(StrEnum):
    """How a target takes `vpdpbusd`'s dot products (int8_dot_flavour picks one)."""

    AVX512_VNNI = "avx512vnni"  # one 512-bit vpdpbusd
    AVX_VNNI = "avxvnni"  # two 256-bit (VEX) vpdpbusd on the halves
    AVX512BW = "avx512bw"  # emulated: 512-bit vpmaddubsw, then vpmaddwd
    AVX2 = "avx2"  # emulated on the 256-bit halves


def int8_dot_flavour(target: tvm.target.Target) -> Int8Dot | None:
    """The fastest int8 dot product `target` has: the first of Int8Dot's flavours whose
    feature it has (AVX-512 VNNI before AVX-VNNI: twice the width); None off x86 LLVM CPUs."""
    if target.kind.name != "llvm":
        return None
    return next((f for f in Int8Dot if codegen.target_has_features(f.value, target)), None)


def has_int8_dot(target: tvm.target.Target) -> bool:
    """Whether the kernels here compile for `target`: an LLVM CPU with AVX2 at least."""
    return int8_dot_flavour(target) is not None


def supports(n: int, k_padded: int) -> bool:
    """Whether a weight [n, k] (K padded to whole groups) is stored in row tiles."""
    return n % TILE == 0 and k_padded % GROUP == 0


def _dpbusd(flavour: Int8Dot, acc, unsigned, signed, byte_range: bool = False):
    """acc (int32x16) + in each lane the sum of its 4 unsigned bytes times its 4 signed ones,
    exact in every flavour (so each flavour's kernel gives the VNNI kernel's bits).

    The emulation's vpmaddubsw SATURATES each pair u * s + u' * s' to int16. No pair does: the
    signed bytes are activation codes in [-127, 127] or the INT22 codes' pieces (low bytes in
    [-128, 127], top ones in [-32, 32]), so |s| <= 128, and the unsigned ones are weight codes:
    4-bit ones <= 15, 5- and 6-bit ones <= 63, 8-bit ones with mins <= 127 (int8_linear):
    |pair| <= 2 * 127 * 128 = 32512 < 2^15. Int8 weights stored w + 128 (`byte_range`: up to
    255, pairs up to 65280) are split into nibbles, u = lo + 16 hi, pairs <= 2 * 15 * 128 each,
    and vpmaddwd weighs hi's sums by 16. (vpmaddwd and the int32 adds wrap as vpdpbusd does.)
    """
    if flavour == Int8Dot.AVX512_VNNI:
        return T.call_llvm_pure_intrin(
            "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, _bytes(unsigned), _bytes(signed)
        )
    if flavour == Int8Dot.AVX_VNNI:  # the intrinsic takes the VEX form with avxvnni alone
        return _join(
            [
                T.call_llvm_pure_intrin(
                    "int32x8",
                    "llvm.x86.avx512.vpdpbusd.256",
                    _half(acc, h),
                    _bytes(_half(unsigned, h)),
                    _bytes(_half(signed, h)),
                )
                for h in range(2)
            ]
        )
    if not byte_range:
        return _pmadd(flavour, acc, unsigned, signed, 1)
    low = T.bitwise_and(unsigned, _broadcast_u32(_NIBBLES))
    high = T.bitwise_and(T.shift_right(unsigned, _broadcast_u32(4)), _broadcast_u32(_NIBBLES))
    return _pmadd(flavour, _pmadd(flavour, acc, low, signed, 1), high, signed, 16)


def _pmadd(flavour: Int8Dot, acc, unsigned, signed, weight: int):
    """acc + weight * (each lane's byte dot) by vpmaddubsw (pairs of u * s, int16) and vpmaddwd
    (pairs of those times `weight`, int32): exact while no pair saturates (see _dpbusd)."""
    if flavour == Int8Dot.AVX512BW:
        pairs = T.call_llvm_pure_intrin(
            "int16x32", "llvm.x86.avx512.pmaddubs.w.512", _bytes(unsigned), _bytes(signed)
        )
        weights = T.broadcast(T.int16(weight), 32)
        return acc + T.call_llvm_pure_intrin(
            "int32x16", "llvm.x86.avx512.pmaddw.d.512", pairs, weights
        )
    assert flavour == Int8Dot.AVX2, flavour
    sums = []
    for h in range(2):
        pairs = T.call_llvm_pure_intrin(
            "int16x16",
            "llvm.x86.avx2.pmadd.ub.sw",
            _bytes(_half(unsigned, h)),
            _bytes(_half(signed, h)),
        )
        weights = T.broadcast(T.int16(weight), 16)
        dots = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, weights)
        sums.append(_half(acc, h) + dots)
    return _join(sums)


def _bytes(vector):
    """A vector of 32-bit lanes as its bytes (int8, 4 a lane)."""
    return T.reinterpret(f"int8x{vector.ty.dtype.lanes * 4}", vector)


def _half(vector, h: int):
    """Lanes [8h, 8h + 8) of a 16-lane vector: one of the two ymm registers LLVM keeps it in
    on AVX2 (a free split)."""
    return tirx.Shuffle([vector], [tirx.IntImm("int32", 8 * h + i) for i in range(8)])


def _join(halves):
    """Two 8-lane vectors as one of 16 lanes."""
    return tirx.Shuffle(halves, [tirx.IntImm("int32", i) for i in range(16)])


def _codes4(codes, piece, i, c):
    """Activation codes c .. c + 3 of row i (one piece of them) as one int32, in all 16 lanes."""
    return T.broadcast(T.reinterpret("int32", codes[piece, i, T.ramp(c, 1, 4)]), TILE)


def int8_linear(
    n: int,
    k: int,
    k_padded: int,
    scale_dtype: str = "float32",
    residual: bool = False,
    activations: Activations = Activations.INT8,
    bits: int = 4,
    offsets: bool = False,
    scale_group: int = GROUP,
    super_group: int = 0,
    *,
    flavour: Int8Dot,
) -> tirx.PrimFunc:
    """out[b, s, n] = sum_k dequantized w[n, k] * integer-rounded x[b, s, k] (+ residual[b, s,
    n]) for a weight of `bits` (4: words of nibbles, uint32 [n, Kp / 8]; 8: int8 [n, Kp]), in
    one kernel: the rows of x are quantized first (`activations`: a key of PIECES), then the
    dot products run parallel over tiles of TILE weight rows, MATRIX_ROWS rows of x at a time
    when there are that many. With `offsets` the codes are unsigned (4-bit, or 8-bit below 128)
    and each group has a min (w = code * scale + min: GGUF's Q4_1 / Q4_K / Q5_1 / Q5_K): the min
    multiplies the group's sum of activations, as llama.cpp's Q4_1 x Q8_1 dot does.
    `scale_group` 16 (GGUF's Q6_K, int8 weights): two weight scales per group of 32
    activations, each half's int32 sum its own (and its own bias correction). With
    `super_group` (GGUF's K-quants, 256) the scales are integers of `scale_dtype` (with
    `offsets`, each group's scale and min side by side) and a float16 buffer holds each
    super-block's d (and -dmin) that multiply them: the kernel forms the float32 scales (exact)
    once per group, and reads 0.5 bits a weight of them instead of 2."""
    groups = k_padded // GROUP
    halves = GROUP // scale_group  # weight scales per activation group
    words = k_padded * bits // 32  # per weight row
    pieces, levels = PIECES[activations]
    # a group's scale (and min) per half, a super-block's d (and dmin): columns of the parts
    per = 2 if offsets and super_group else 1
    supers = k_padded // super_group if super_group else 0
    s_cols = groups * halves * per
    # the third buffer: the mins (codes with mins, flat scales) or the super-blocks' d
    extra_type = (n, supers * per) if super_group else (n, groups)
    extra_dtype = "float16" if super_group else scale_dtype
    # (groups per super-block is 1 without them: the same loops)
    layout = (halves, per, super_group // GROUP if super_group else 1, offsets, bool(super_group))
    extra = (extra_type[0] * extra_type[1], extra_dtype)
    shape = (n, k, k_padded, groups, words, bits, layout, extra)
    w_type = (n, words) if bits < 8 else (n, k_padded)
    w_dtype = "uint32" if bits < 8 else "int8"
    assert bits in (4, 5, 6, 8), bits
    assert not offsets or pieces == 1, "codes with mins take int8 activations"
    assert halves == 1 or (pieces == 1 and not offsets), "Q6_K's layout only"
    assert not super_group or (super_group % GROUP == 0 and pieces == 1), "K-quants' layout only"

    @T.macro(hygienic=False)
    def body(
        var_x,
        w,
        w_scale,
        w_extra,
        res,
        out,
        batch,
        seq,
        shape,
        scale_dtype,
        pieces,
        levels,
        flavour,
    ):
        n, k, k_padded, groups, words, bits, layout, extra = T.meta_var(shape)
        halves, per = T.meta_var(layout[:2])
        x = T.match_buffer(var_x, (batch, seq, k), "float32")
        w_flat = T.decl_buffer((n * words,), "uint32", data=w.data)
        s_flat = T.decl_buffer((n * groups * halves * per,), scale_dtype, data=w_scale.data)
        e_flat = T.meta_var(
            None if w_extra is None else T.decl_buffer((extra[0],), extra[1], data=w_extra.data)
        )
        rows = T.meta_var(batch * seq)
        codes = T.alloc_buffer((pieces, rows, k_padded), "int8")
        correction = T.alloc_buffer((2, rows, groups * halves), "int32")  # see _quantize_row
        scale = T.alloc_buffer((rows, groups), "float32")
        # with mins: each group's activations as rounded, summed (scale * sum of codes)
        x_sum = T.alloc_buffer((rows, groups), "float32")
        quantized = T.meta_var((k, groups, halves, pieces, levels, bits, codes, correction, x_sum))
        parts = T.meta_var(
            (
                w_flat,
                s_flat,
                e_flat,
                layout,
                codes,
                correction,
                scale,
                x_sum,
                res,
                out,
                groups,
                halves,
                words,
            )
        )
        if rows < MATRIX_ROWS:  # decode: a parallel launch would cost more than the rows
            for i in range(rows):
                _quantize_row(x, i // seq, i % seq, *quantized, scale, i)
            for tile in T.parallel(n // TILE):
                for i in range(rows):
                    _tile_rows(*parts, pieces, bits, seq, tile, i, 1, i, flavour)
        else:
            for i in T.parallel(rows):
                _quantize_row(x, i // seq, i % seq, *quantized, scale, i)
            # MATRIX_ROWS rows of x share each unpacked weight vector; a last, partial step
            # repeats the last row (the same values written twice).
            for tile in T.parallel(n // TILE):
                for i in range((rows + MATRIX_ROWS - 1) // MATRIX_ROWS):
                    _tile_rows(
                        *parts,
                        pieces,
                        bits,
                        seq,
                        tile,
                        i * MATRIX_ROWS,
                        MATRIX_ROWS,
                        rows - 1,
                        flavour,
                    )

    common = (shape, scale_dtype, pieces, levels, flavour)
    # One signature per combination: the third part (mins, or the super-blocks' d) and the
    # residual are buffers of their own.
    if (offsets or super_group) and residual:

        @T.prim_func(private=True)
        def func(
            var_x: T.handle,
            w: T.Buffer(w_type, w_dtype),
            w_scale: T.Buffer((n, s_cols), scale_dtype),
            w_extra: T.Buffer(extra_type, extra_dtype),
            var_residual: T.handle,
            var_out: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            batch, seq = T.int64(), T.int64()
            res = T.match_buffer(var_residual, (batch, seq, n), "float32")
            out = T.match_buffer(var_out, (batch, seq, n), "float32")
            body(var_x, w, w_scale, w_extra, res, out, batch, seq, *common)

    elif offsets or super_group:

        @T.prim_func(private=True)
        def func(
            var_x: T.handle,
            w: T.Buffer(w_type, w_dtype),
            w_scale: T.Buffer((n, s_cols), scale_dtype),
            w_extra: T.Buffer(extra_type, extra_dtype),
            var_out: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            batch, seq = T.int64(), T.int64()
            out = T.match_buffer(var_out, (batch, seq, n), "float32")
            body(var_x, w, w_scale, w_extra, None, out, batch, seq, *common)

    elif residual:

        @T.prim_func(private=True)
        def func(
            var_x: T.handle,
            w: T.Buffer(w_type, w_dtype),
            w_scale: T.Buffer((n, s_cols), scale_dtype),
            var_residual: T.handle,
            var_out: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            batch, seq = T.int64(), T.int64()
            res = T.match_buffer(var_residual, (batch, seq, n), "float32")
            out = T.match_buffer(var_out, (batch, seq, n), "float32")
            body(var_x, w, w_scale, None, res, out, batch, seq, *common)

    else:

        @T.prim_func(private=True)
        def func(
            var_x: T.handle,
            w: T.Buffer(w_type, w_dtype),
            w_scale: T.Buffer((n, s_cols), scale_dtype),
            var_out: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            batch, seq = T.int64(), T.int64()
            out = T.match_buffer(var_out, (batch, seq, n), "float32")
            body(var_x, w, w_scale, None, None, out, batch, seq, *common)

    return func


@T.macro(hygienic=False)
def _tile_rows(
    w,
    w_scale,
    w_extra,
    layout,
    codes,
    correction,
    scale,
    x_sum,
    res,
    out,
    groups,
    halves,
    words,
    pieces,
    bits,
    seq,
    tile,
    first,
    count,
    last,
    flavour,
):
    """Outputs [tile * TILE, +TILE) of rows first .. first + count - 1 (capped at `last`)."""
    # default scope: small stack arrays that LLVM keeps in registers; row j's float sums at
    # lanes j * TILE, its int32 sum of piece p at (j * stride + p) * TILE (with halves, pieces
    # is 1: half h's at (j * stride + h) * TILE)
    per, per_super, offsets, supers = T.meta_var(layout[1:])
    stride = T.meta_var(pieces * halves)  # int32 sums per row of x
    acc = T.alloc_buffer((count * TILE,), "float32")
    dot = T.alloc_buffer((count * stride * TILE,), "int32")
    d = T.alloc_buffer((per * TILE,), "float32")  # the super-block's d (and -dmin)
    group_words = T.meta_var(GROUP * bits // 32)
    # words of codes per half (int8: 4 k a word; else words of nibbles, 8 k, before the planes)
    half_words = T.meta_var((8 if bits == 8 else 4) // halves)
    scale_cols = T.meta_var(groups * halves * per)
    for j in T.unroll(count):
        acc[_lanes_of(j)] = T.broadcast(T.float32(0), TILE)
    for b in range(groups // per_super):
        if supers:  # converted once per super-block, multiplied into each group's scales
            for m in T.unroll(per):
                d[_lanes_of(m)] = T.Cast(
                    "float32x16", w_extra[_tile_lanes(tile, groups // per_super * per, b * per + m)]
                )
        for gi in range(per_super):
            g = T.meta_var(b * per_super + gi)
            for j in T.unroll(count):
                # the corrections start the least significant piece's sum and the top one's
                # (when it joins in float)
                row = T.meta_var(T.min(first + j, last))
                if not offsets:
                    for h in T.unroll(halves):
                        dot[_lanes_of(j * stride + h)] = T.broadcast(
                            correction[0, row, g * halves + h], TILE
                        )
                else:  # unsigned codes: no bias to correct
                    dot[_lanes_of(j * stride)] = T.broadcast(T.int32(0), TILE)
                for p in T.unroll(1, _int_pieces(pieces, bits)):
                    dot[_lanes_of(j * stride + p)] = T.broadcast(T.int32(0), TILE)
                if _float_top(pieces, bits):
                    dot[_lanes_of(j * stride + pieces - 1)] = T.broadcast(
                        correction[1, row, g * halves], TILE
                    )
            # the cache lines of the group PREFETCH ahead: a hint, harmless past the weights' end
            for line in T.unroll(group_words * TILE * 4 // 64):
                T.evaluate(
                    T.call_llvm_intrin(
                        "void",
                        "llvm.prefetch.p0",
                        T.address_of(
                            w[(tile * words + (g + PREFETCH) * group_words) * TILE + line * 16]
                        ),
                        T.int32(0),
                        T.int32(3),
                        T.int32(1),
                    )
                )
            for o in T.unroll(8 if bits == 8 else 4):
                # word o of the group for the tile's 16 rows: vpdpbusd operands shared by all j
                wv = T.meta_var(w[_tile_lanes(tile, words, g * group_words + o)])
                if bits < 8:  # 8 k: low nibbles k .. k + 3, high nibbles k + 4 .. k + 7
                    low = T.meta_var(
                        _with_high_bits(
                            T.bitwise_and(wv, _broadcast_u32(_NIBBLES)),
                            w,
                            tile,
                            words,
                            g * group_words,
                            2 * o,
                            bits,
                        )
                    )
                    high = T.meta_var(
                        _with_high_bits(
                            T.bitwise_and(
                                T.shift_right(wv, _broadcast_u32(4)), _broadcast_u32(_NIBBLES)
                            ),
                            w,
                            tile,
                            words,
                            g * group_words,
                            2 * o + 1,
                            bits,
                        )
                    )
                    for j in T.unroll(count):
                        for p in T.unroll(pieces):
                            i = T.meta_var(T.min(first + j, last))
                            c = T.meta_var(g * GROUP + o * 8)
                            # (halves > 1 only with one piece: the sum of the word's half)
                            sums = T.meta_var(_lanes_of(j * stride + p + o // half_words))
                            # (codes <= 63: no saturation in the emulation, see _dpbusd)
                            first_four = T.meta_var(
                                _dpbusd(flavour, dot[sums], low, _codes4(codes, p, i, c))
                            )
                            dot[sums] = _dpbusd(
                                flavour, first_four, high, _codes4(codes, p, i, c + 4)
                            )
                else:  # 4 k of int8, sign bits flipped: w + 128 (with mins: unsigned already)
                    biased = T.meta_var(
                        wv if offsets else T.bitwise_xor(wv, _broadcast_u32(_SIGN_BITS))
                    )
                    for j in T.unroll(count):
                        for p in T.unroll(pieces):
                            i = T.meta_var(T.min(first + j, last))
                            # (halves > 1 only with one piece: the sum of the word's half)
                            sums = T.meta_var(_lanes_of(j * stride + p + o // half_words))
                            # w + 128 spans the byte (with mins, codes <= 127 do not)
                            dot[sums] = _dpbusd(
                                flavour,
                                dot[sums],
                                biased,
                                _codes4(codes, p, i, g * GROUP + o * 4),
                                byte_range=not offsets,
                            )
            w_scales = T.meta_var(
                _group_scales(w_scale, d, tile, scale_cols, g * halves * per, 0, supers)
            )
            for j in T.unroll(count):
                # the int32 pieces: sum * 256 + the next, most significant first
                for q in T.unroll(_int_pieces(pieces, bits) - 1):
                    top_int = T.meta_var(_int_pieces(pieces, bits) - 1)
                    higher = T.meta_var(dot[_lanes_of(j * stride + top_int - q)])
                    lower = T.meta_var(_lanes_of(j * stride + top_int - 1 - q))
                    dot[lower] = dot[lower] + T.shift_left(higher, T.broadcast(T.int32(8), TILE))
                x_scale = T.meta_var(T.broadcast(scale[T.min(first + j, last), g], TILE))
                low = T.meta_var(T.Cast("float32x16", dot[_lanes_of(j * stride)]))
                if _float_top(pieces, bits):
                    top = T.meta_var(T.Cast("float32x16", dot[_lanes_of(j * stride + pieces - 1)]))
                    value = T.meta_var(top * T.float32(256 ** (pieces - 1)) + low)
                    acc[_lanes_of(j)] = acc[_lanes_of(j)] + value * (w_scales * x_scale)
                elif not offsets:
                    acc[_lanes_of(j)] = acc[_lanes_of(j)] + low * (w_scales * x_scale)
                    for h in T.unroll(1, halves):  # the other halves' sums, with their scales
                        scales_h = T.meta_var(
                            _group_scales(w_scale, d, tile, scale_cols, g * halves + h, 0, supers)
                        )
                        sum_h = T.meta_var(T.Cast("float32x16", dot[_lanes_of(j * stride + h)]))
                        acc[_lanes_of(j)] = acc[_lanes_of(j)] + sum_h * (scales_h * x_scale)
                else:  # the min beside the scale, or in a buffer of its own
                    mins = T.meta_var(
                        _group_scales(w_scale, d, tile, scale_cols, g * per, 1, supers)
                        if supers
                        else T.Cast("float32x16", w_extra[_tile_lanes(tile, groups, g)])
                    )
                    x_total = T.meta_var(T.broadcast(x_sum[T.min(first + j, last), g], TILE))
                    acc[_lanes_of(j)] = (
                        acc[_lanes_of(j)] + low * (w_scales * x_scale) + mins * x_total
                    )
    for j in T.unroll(count):
        i = T.meta_var(T.min(first + j, last))
        cols = T.meta_var(T.ramp(tile * TILE, 1, TILE))
        if res is None:
            out[i // seq, i % seq, cols] = acc[_lanes_of(j)]
        else:
            out[i // seq, i % seq, cols] = acc[_lanes_of(j)] + res[i // seq, i % seq, cols]


def _with_high_bits(nibbles, w, tile, words: int, group_col, t: int, bits: int):
    """Operand t (0 .. 7: 4 bytes of k = 4t + e in each lane) of a group of 5- or 6-bit codes:
    its nibbles with the high bits ORed in at bit 4 of each byte, from the group's plane words
    after its 4 words of nibbles (quantization._pack_row_codes: they sit at bit (t * P) % 8 of
    each byte of plane word t * P // 8, P = bits - 4): one shift, one mask, one or."""
    planes = bits - 4
    if not planes:
        return nibbles
    plane = w[_tile_lanes(tile, words, group_col + 4 + t * planes // 8)]
    at = t * planes % 8  # (t is the unrolled loop's variable: constants once unrolled)
    # up by 4 - at, or down by at - 4: one of the two shifts is by 0
    up = T.broadcast(T.Cast("uint32", 4 - T.min(at, 4)), TILE)
    down = T.broadcast(T.Cast("uint32", T.max(at, 4) - 4), TILE)
    moved = T.shift_right(T.shift_left(plane, up), down)
    mask = _broadcast_u32(0x01010101 * (((1 << planes) - 1) << 4))
    return T.bitwise_or(nibbles, T.bitwise_and(moved, mask))


def _tile_lanes(tile, cols: int, col):
    """The TILE lanes of column `col` of a row-tiled part with `cols` columns, in tile `tile`."""
    return T.ramp((tile * cols + col) * TILE, 1, TILE)


def _group_scales(w_scale, d, tile, cols: int, col, m: int, supers: bool):
    """A group's weight scales (m = 0) or mins (1) as float32x16 from column col + m of the
    scale part; with super-blocks, the integers times the super-block's d (or -dmin): exact
    (an fp16 times an integer of 8 bits), equal to the product stored as float32."""
    value = T.Cast("float32x16", w_scale[_tile_lanes(tile, cols, col + m)])
    return value * d[_lanes_of(m)] if supers else value


def _float_top(pieces: int, bits: int) -> bool:
    """Whether the top piece's sum joins in float: with 8-bit weights, 256^2 times it could
    overflow int32 (4-bit weights stay in range, which saves a convert per group and row)."""
    return pieces > 1 and bits == 8


def _int_pieces(pieces: int, bits: int) -> int:
    """How many pieces' sums are added up in int32."""
    return pieces - 1 if _float_top(pieces, bits) else pieces


def _broadcast_u32(value: int):
    return T.broadcast(T.uint32(value), TILE)


def _lanes_of(j):
    """The j-th run of TILE lanes in an accumulator array."""
    return T.ramp(j * TILE, 1, TILE)


@T.macro(hygienic=False)
def _quantize_row(
    x, bi, si, k, groups, halves, pieces, levels, bits, codes, correction, x_sum, scale, i
):
    """Row i of x as integer codes in [-levels, levels] per group of 32 (zero past k), each
    code split into `pieces` signed bytes (least significant first), with each group's scale
    and corrections -bias * (sum of the group's codes; of each half's with `halves` 2): of the
    pieces added up in int32 in correction[0], of the top one in correction[1] when it joins in
    float (see _float_top). The bias is what makes the weights unsigned: 8 for 4-bit ones, 128
    for int8. (Codes with mins are unsigned already: their kernel ignores the corrections and
    reads x_sum, each group's scale * sum of codes.)"""
    for g in range(groups):
        amax = T.alloc_buffer((1,), "float32")
        total = T.alloc_buffer((pieces,), "int32")
        rest = T.alloc_buffer((1,), "int32")
        low = T.alloc_buffer((1,), "int32")
        amax[0] = T.float32(0)
        for e in range(GROUP):
            if g * GROUP + e < k:
                amax[0] = T.max(amax[0], T.abs(x[bi, si, g * GROUP + e]))
        d = T.meta_var(amax[0] / T.float32(levels))
        for h in range(halves):
            for p in T.unroll(pieces):
                total[p] = 0
            for e in range(GROUP // halves):
                c = T.meta_var(g * GROUP + h * (GROUP // halves) + e)
                v = T.meta_var(T.if_then_else(c < k, x[bi, si, T.min(c, k - 1)], T.float32(0)))
                rest[0] = T.Cast("int32", T.Select(d > T.float32(0), T.round(v / d), T.float32(0)))
                for p in T.unroll(pieces):
                    # the signed low byte, then the rest (an exact multiple of 256) shifted down
                    codes[p, i, c] = T.Cast("int8", T.bitwise_and(rest[0] + 128, 255) - 128)
                    total[p] = total[p] + T.Cast("int32", codes[p, i, c])
                    rest[0] = T.shift_right(rest[0] - T.Cast("int32", codes[p, i, c]), 8)
            bias = T.meta_var(1 << (bits - 1))
            low[0] = 0  # the sum of the codes' pieces that are added up in int32
            for p in T.unroll(_int_pieces(pieces, bits)):
                low[0] = low[0] + T.shift_left(total[p], 8 * p)
            correction[0, i, g * halves + h] = -bias * low[0]
            if _float_top(pieces, bits):
                correction[1, i, g * halves + h] = -bias * total[pieces - 1]
        scale[i, g] = d
        if halves == 1:  # (codes with mins have no halves)
            x_sum[i, g] = d * T.Cast("float32", total[0])

"""Quantized KV-cache pages (`--kv-cache-dtype int8|fp8`): the byte layout and its TIR kernels.

TVM's paged KV cache (C++) holds one page array per layer, of one dtype, and insists that the
fused qkv it is handed, its q/k/v scratch and the attention output all have that dtype. So a
quantized cache is an int8 cache whose "heads" are byte rows the graph packs and relaxlm's
kernels read (the C++ side and TVM's page kernels only move the bytes):

- a K or V row (one token, one kv head) is R = head_dim + 2 bytes: head_dim codes (int8, or
  float8 e4m3 bits), then the row's float16 scale: x ~= code * scale, scale = amax / qmax.
  A scale per token per head needs no calibration and follows outliers token by token; two
  bytes keep the row at 66/128 of float16's for head_dim 64 (1.94x the tokens).
- q and the attention output travel unquantized, as the bytes of the model's dtype, in
  `q_rows` rows of R bytes (padded): [tokens, q_rows + 2 * kv_heads, R] int8 in,
  [tokens, q_rows, R] int8 out (the cache is told it has q_rows query heads).

The cache applies no RoPE (it would rotate bytes): `pack_qkv` rotates q and k, quantizes and
packs before the cache's attention call, `unpack_output` reads the output after it, and
`merge_state` replaces the cache's merge of two partial attentions (over packed outputs).
Each kernel here has a CPU schedule and a GPU one (`gpu=True`: a thread per head row, element
or (token, head)), sharing the per-row code.
int8 / fp8 round per token and head: x -> clip(x / scale) -> round-to-nearest-even (int8) or
e4m3 (fp8, saturating at 448), with scale = float16(max(amax / qmax, 2**-14)).
"""

import math
from dataclasses import dataclass

from relaxlm.errors import RelaxlmError
from relaxlm.frontends.ops import RopeSpec
from relaxlm.tvm_api import T, tirx

from .rope import _rotate_heads, rope_angles, split_token

# split_token is a non-hygienic macro: its body's names resolve where it is used
_MACRO_NAMES = (_rotate_heads,)

SCALE_BYTES = 2  # one float16 per row
GPU_THREADS = 64  # threads per block of the GPU kernels (here and in attention_kernels.py)
# Smallest scale stored: float16's smallest normal, so a scale never loses bits to subnormals;
# rows smaller than qmax * this keep an absolute error under 2**-15.
MIN_SCALE = 2.0**-14
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVQuant:
    """Codes of a quantized KV row: their dtype and the largest magnitude they hold."""

    name: str  # what --kv-cache-dtype calls it
    codes: str  # "int8" | "float8_e4m3fn"
    qmax: float


KV_QUANTS = {
    "int8": KVQuant("int8", "int8", 127.0),
    "fp8": KVQuant("fp8", "float8_e4m3fn", 448.0),
}
KV_CACHE_DTYPES = ("auto", "float16", *KV_QUANTS)


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """RelaxlmError unless `kv_cache_dtype` is one relaxlm builds."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise RelaxlmError(
            f"kv_cache_dtype={kv_cache_dtype!r} is unknown; use one of {', '.join(KV_CACHE_DTYPES)}"
        )


@dataclass(frozen=True)
class QuantLayout:
    """Where the bytes of one forward sit in a quantized cache (see the module docstring)."""

    quant: KVQuant
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # the model's: q and the output keep it

    @property
    def row_bytes(self) -> int:
        return self.head_dim + SCALE_BYTES

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def q_rows(self) -> int:
        """R-byte rows holding one token's q (and its output), in whole `dtype` elements."""
        rows = math.ceil(self.num_q_heads * self.head_dim * self.itemsize / self.row_bytes)
        while rows * self.row_bytes % self.itemsize:
            rows += 1
        return rows

    @property
    def packed_rows(self) -> int:
        return self.q_rows + 2 * self.num_kv_heads

    @property
    def token_bytes(self) -> int:
        """One token's packed rows: q's, then its K and V rows."""
        return self.packed_rows * self.row_bytes


def _sizes(layout: QuantLayout) -> tuple[int, int, int, str, KVQuant]:
    """q heads, kv heads, head_dim, the model's dtype and the codes: what a kernel unpacks."""
    return (layout.num_q_heads, layout.num_kv_heads, layout.head_dim, layout.dtype, layout.quant)


def numpy_quantize(x, quant: KVQuant):
    """Reference: rows of x [..., head_dim] float -> (codes as float32, float32 scale [..., 1]),
    as `pack_qkv` stores them (scale rounded to float16 first, codes from that scale)."""
    import ml_dtypes
    import numpy as np

    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = np.maximum(amax / np.float32(quant.qmax), np.float32(MIN_SCALE))
    scale = scale.astype(np.float16).astype(np.float32)
    y = np.clip(x / scale, -quant.qmax, quant.qmax)
    if quant.codes == "int8":
        codes = np.rint(y)
    else:
        codes = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return codes.astype(np.float32), scale


def _code(x: tirx.Expr, scale: tirx.Expr, quant: KVQuant) -> tirx.Expr:
    """The code of x (float32) at `scale`, as an int8 (float8 codes: their bits)."""
    y = T.max(T.min(x / scale, T.float32(quant.qmax)), T.float32(-quant.qmax))
    if quant.codes == "int8":
        return T.cast(T.nearbyint(y), "int8")
    return _encode_e4m3(y)


def _encode_e4m3(y: tirx.Expr) -> tirx.Expr:
    """The e4m3 bits (as int8) of y in [-448, 448], rounded to nearest even like ml_dtypes.
    (TVM 0.27's float32 -> float8_e4m3fn cast on LLVM flushes subnormals, |y| < 2**-6, to
    zero and does not round to nearest.)"""
    bits = T.reinterpret("int32", y)
    sign = (bits >> 24) & 0x80
    a = T.reinterpret("float32", bits & 0x7FFFFFFF)
    magnitude = bits & 0x7FFFFFFF
    # normal: round the mantissa to 3 bits (ties to even), then rebias the exponent 127 -> 7
    rounded = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20
    normal = rounded - (120 << 3)
    # subnormal: a multiple of 2**-9
    subnormal = T.cast(T.nearbyint(a * T.float32(512.0)), "int32")
    return T.cast(sign | T.Select(a < T.float32(2.0**-6), subnormal, normal), "int8")


def pack_qkv(layout: QuantLayout, rope: RopeSpec | None = None, gpu: bool = False) -> tirx.PrimFunc:
    """qkv [tokens, hq + 2 hkv, d] (dtype) and positions [tokens] -> [tokens, q_rows + 2 hkv, R]
    int8: q as its bytes, each K and V row as codes and a float16 scale; q and k rotated by
    `rope` first (the cache's kind of RoPE, not LongRoPE; None: as they are), each token's
    cos/sin computed once, as the cache's own CPU kernel does. `gpu`: a thread per head row."""
    if gpu:
        return _pack_qkv_gpu(layout, rope)
    hq, hkv, d, dtype, quant = _sizes(layout)
    rows, r, token_bytes = layout.packed_rows, layout.row_bytes, layout.token_bytes
    q_elems = token_bytes // layout.itemsize  # a token's row in dtype elements

    angle_value, half, rotary_dim = rope_angles(rope, d)
    apply_rope = int(rope is not None)

    @T.prim_func(s_tir=True)
    def relaxlm_kv_pack(var_qkv: T.handle, var_positions: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        qkv = T.match_buffer(var_qkv, (n, hq + 2 * hkv, d), dtype)
        positions = T.match_buffer(var_positions, (n,), "int32")
        out = T.match_buffer(var_out, (n, rows, r), "int8")
        q_out = T.decl_buffer((n, hq, d), dtype, data=out.data, strides=(q_elems, d, 1))
        codes = T.decl_buffer((n * token_bytes,), "int8", data=out.data)
        scales = T.decl_buffer((n * (token_bytes // 2),), "float16", data=out.data)
        kv = T.alloc_buffer((n, 2 * hkv, d), dtype)  # rotated k, then v, before rounding
        k_rows = T.decl_buffer((n, hkv, d), dtype, data=kv.data, strides=(2 * hkv * d, d, 1))
        v_rows = T.decl_buffer(
            (n, hkv, d), dtype, data=kv.data, strides=(2 * hkv * d, d, 1), elem_offset=hkv * d
        )
        for t in T.parallel(n):
            # q straight into its bytes; k and v into `kv`
            split_token(
                qkv,
                q_out,
                k_rows,
                v_rows,
                t,
                apply_rope,
                positions,
                angle_value,
                half,
                rotary_dim,
            )
        for t in T.parallel(n):
            with T.sblock("pack"):
                T.reads()
                T.writes()
                state = T.sblock_alloc_buffer((2,), "float32")
                for h in T.serial(2 * hkv):
                    _quantize_row(
                        kv,
                        t,
                        h,
                        codes,
                        scales,
                        t * token_bytes + (layout.q_rows + h) * r,
                        state,
                        d,
                        quant,
                    )

    return relaxlm_kv_pack


@T.macro(hygienic=False)
def _quantize_row(src, t, h, codes, scales, base, state, d, quant):
    """The K/V row src[t, h] (d values) as codes at byte `base` of `codes`, then its float16
    scale; `state` is scratch for the row's amax and scale."""
    state[0] = T.float32(0)
    for x in T.serial(d):
        state[0] = T.max(state[0], T.abs(T.cast(src[t, h, x], "float32")))
    # Codes are made from the float16 scale as stored, so dequantizing is exact.
    state[1] = T.cast(
        T.cast(T.max(state[0] / T.float32(quant.qmax), T.float32(MIN_SCALE)), "float16"),
        "float32",
    )
    for x in T.serial(d):
        codes[base + x] = _code(T.cast(src[t, h, x], "float32"), state[1], quant)
    scales[(base + d) // 2] = T.cast(state[1], "float16")


def _gpu_threads(count: tirx.Expr):
    """Blocks of GPU_THREADS threads covering `count` items (at least one block: CUDA refuses
    an empty grid)."""
    return T.max((count + GPU_THREADS - 1) // GPU_THREADS, 1)


def _pack_qkv_gpu(layout: QuantLayout, rope: RopeSpec | None) -> tirx.PrimFunc:
    """`pack_qkv` with a GPU thread per (token, head row): q heads rotated into their bytes, K
    and V rows rotated (k), rounded to dtype as on CPUs, then quantized."""
    hq, hkv, d, dtype, quant = _sizes(layout)
    rows, r, token_bytes = layout.packed_rows, layout.row_bytes, layout.token_bytes
    q_elems = token_bytes // layout.itemsize  # a token's row in dtype elements
    heads = hq + 2 * hkv
    angle_value, half, rotary_dim = rope_angles(rope, d)
    rotated = hq + hkv if rope is not None else 0  # heads 0 .. rotated - 1 get RoPE

    def value(qkv, t, c, x, position):
        """Element x of head c of token t, rotated (rotate-half) if c < rotated, in dtype."""
        plain = qkv[t, c, x]
        if rotated == 0:
            return plain
        i = T.if_then_else(x < half, x, x - half)
        partner = T.if_then_else(x < half, -qkv[t, c, x + half], qkv[t, c, x - half])
        turned = T.cast(
            angle_value(position, i, 0) * T.cast(plain, "float32")
            + angle_value(position, i, 1) * T.cast(partner, "float32"),
            dtype,
        )
        return T.if_then_else(tirx.all(c < rotated, x < rotary_dim), turned, plain)

    @T.prim_func(s_tir=True)
    def relaxlm_kv_pack(var_qkv: T.handle, var_positions: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        qkv = T.match_buffer(var_qkv, (n, heads, d), dtype)
        positions = T.match_buffer(var_positions, (n,), "int32")
        out = T.match_buffer(var_out, (n, rows, r), "int8")
        q_out = T.decl_buffer((n, hq, d), dtype, data=out.data, strides=(q_elems, d, 1))
        codes = T.decl_buffer((n * token_bytes,), "int8", data=out.data)
        scales = T.decl_buffer((n * (token_bytes // 2),), "float16", data=out.data)
        for bx in T.thread_binding(_gpu_threads(n * heads), "blockIdx.x"):
            for tx in T.thread_binding(GPU_THREADS, "threadIdx.x"):
                with T.sblock("pack"):
                    T.reads()
                    T.writes()
                    row = T.sblock_alloc_buffer((1, 1, d), dtype, scope="local")
                    state = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    if bx * GPU_THREADS + tx < n * heads:
                        t: T.let[T.int64] = (bx * GPU_THREADS + tx) // heads
                        c: T.let[T.int64] = (bx * GPU_THREADS + tx) % heads
                        if c < hq:
                            for x in T.serial(d):
                                q_out[t, c, x] = value(qkv, t, c, x, positions[t])
                        else:
                            for x in T.serial(d):
                                row[0, 0, x] = value(qkv, t, c, x, positions[t])
                            _quantize_row(
                                row,
                                0,
                                0,
                                codes,
                                scales,
                                t * token_bytes + (layout.q_rows + c - hq) * r,
                                state,
                                d,
                                quant,
                            )

    return relaxlm_kv_pack


def unpack_output(layout: QuantLayout, gpu: bool = False) -> tirx.PrimFunc:
    """The cache's output [tokens, q_rows, R] int8 -> [tokens, hq, d] (dtype): the bytes the
    attention kernels wrote. `gpu`: a thread per element."""
    hq, d, dtype = layout.num_q_heads, layout.head_dim, layout.dtype
    rows, r = layout.q_rows, layout.row_bytes
    elems = rows * r // layout.itemsize

    @T.prim_func(s_tir=True)
    def relaxlm_kv_unpack(var_o: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        o = T.match_buffer(var_o, (n, rows, r), "int8")
        out = T.match_buffer(var_out, (n, hq, d), dtype)
        values = T.decl_buffer((n * elems,), dtype, data=o.data)
        if gpu:
            for bx in T.thread_binding(_gpu_threads(n * hq * d), "blockIdx.x"):
                for tx in T.thread_binding(GPU_THREADS, "threadIdx.x"):
                    with T.sblock("unpack"):
                        T.reads()
                        T.writes()
                        if bx * GPU_THREADS + tx < n * hq * d:
                            _unpack_element(
                                out,
                                values,
                                (bx * GPU_THREADS + tx) // (hq * d),
                                (bx * GPU_THREADS + tx) % (hq * d),
                                d,
                                elems,
                            )
        else:
            for t in T.parallel(n):
                with T.sblock("unpack"):
                    T.reads()
                    T.writes()
                    for i in T.serial(hq * d):
                        _unpack_element(out, values, t, i, d, elems)

    return relaxlm_kv_unpack


@T.macro(hygienic=False)
def _unpack_element(out, values, t, i, d, elems):
    """Element i of token t's output heads, from its place in the packed rows."""
    out[t, i // d, i % d] = values[t * elems + i]


def merge_state(layout: QuantLayout, gpu: bool = False) -> tirx.PrimFunc:
    """The cache's `tir_attention_merge_state(_cpu)` for packed outputs: merge two partial
    attentions (outputs and base-2 log-sum-exps) of every real head, in place. `gpu`: a thread
    per (token, head)."""
    hq, d, dtype = layout.num_q_heads, layout.head_dim, layout.dtype
    rows, r = layout.q_rows, layout.row_bytes
    elems = rows * r // layout.itemsize

    @T.prim_func(s_tir=True)
    def merge_state_inplace(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = T.int32()
        v_bytes = T.match_buffer(v, (n, rows, r), "int8")
        lse = T.match_buffer(s, (n, rows), "float32")
        other_bytes = T.match_buffer(v_other, (n, rows, r), "int8")
        lse_other = T.match_buffer(s_other, (n, rows), "float32")
        out = T.decl_buffer((n * elems,), dtype, data=v_bytes.data)
        other = T.decl_buffer((n * elems,), dtype, data=other_bytes.data)
        if gpu:
            for bx in T.thread_binding(_gpu_threads(n * hq), "blockIdx.x"):
                for tx in T.thread_binding(GPU_THREADS, "threadIdx.x"):
                    with T.sblock("merge"):
                        T.reads()
                        T.writes()
                        w = T.sblock_alloc_buffer((3,), "float32", scope="local")
                        if bx * GPU_THREADS + tx < n * hq:
                            _merge_head(
                                out,
                                lse,
                                other,
                                lse_other,
                                (bx * GPU_THREADS + tx) // hq,
                                (bx * GPU_THREADS + tx) % hq,
                                w,
                                d,
                                elems,
                                dtype,
                            )
        else:
            for t in T.parallel(n):
                with T.sblock("merge"):
                    T.reads()
                    T.writes()
                    w = T.sblock_alloc_buffer((3,), "float32")
                    for h in T.serial(hq):
                        _merge_head(out, lse, other, lse_other, t, h, w, d, elems, dtype)

    return merge_state_inplace


@T.macro(hygienic=False)
def _merge_head(out, lse, other, lse_other, t, h, w, d, elems, dtype):
    """Head h of token t: `out` and `lse` become the merge of theirs and `other`'s (values at
    t * elems + h * d + x), through the scratch w (max, own weight, other weight)."""
    w[0] = T.max(lse[t, h], lse_other[t, h])
    w[1] = T.exp2(lse[t, h] - w[0])
    w[2] = T.exp2(lse_other[t, h] - w[0])
    lse[t, h] = T.log2(w[1] + w[2]) + w[0]
    w[0] = w[1] + w[2]
    for x in T.serial(d):
        out[t * elems + h * d + x] = T.cast(
            (
                T.cast(out[t * elems + h * d + x], "float32") * w[1]
                + T.cast(other[t * elems + h * d + x], "float32") * w[2]
            )
            / w[0],
            dtype,
        )

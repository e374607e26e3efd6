"""Rotary embedding computed in the graph, for attention whose KV cache cannot apply it.

One paged KV cache applies one RoPE to every layer, from its own positions. Models whose layers
differ (Gemma 3: local and global bases) or whose RoPE the cache gets wrong (Phi-3 LongRoPE)
get a cache without RoPE, and `lower_attention_to_paged_kv` rotates q and k here first, at the
positions the cache reports. Frequencies follow transformers (`modeling_rope_utils`).
"""

from tvm import sym, te
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func

from relaxlm.frontends.ops import RopeSpec
from relaxlm.tvm_api import T, tirx


def longrope_factors(spec: RopeSpec) -> list[list[float]]:
    """[short_factor, long_factor], the table `rope_te` takes for LongRoPE."""
    return [list(spec.scaling["short_factor"]), list(spec.scaling["long_factor"])]


def rope_te(
    qkv: te.Tensor,
    positions: te.Tensor,
    factors: te.Tensor | None = None,
    *,
    spec: RopeSpec,
    num_rotated_heads: int,
) -> te.Tensor:
    """qkv [tokens, heads, head_dim] with the first `num_rotated_heads` heads rotated.

    positions: [tokens] int32. factors: [2, rotary_dim / 2] from `longrope_factors` when
    `spec` is LongRoPE, else None.
    """
    _, _, head_dim = qkv.shape
    rotary_dim = spec.rotary_dim or int(head_dim)
    half = rotary_dim // 2
    longrope = spec.scaling.get("rope_type") == "longrope"
    assert longrope == (factors is not None), "LongRoPE takes its factor table, others none"

    def cos_sin(pos: tirx.Expr, i: tirx.Var) -> tuple[tirx.Expr, tirx.Expr, dict]:
        """cos, sin, and the variables (name -> value) they use."""
        if longrope:
            return (*_longrope_cos_sin(pos, i, spec, factors, rotary_dim), {})
        # The cache's own frequency functions (default, llama3), as RopeMode.NORMAL uses.
        return switch_rope_freq_func(spec.scaling)(
            pos.astype("float32") / spec.scale, i, rotary_dim, spec.theta, "float32"
        )

    def rotate(t: tirx.Var, h: tirx.Var, i: tirx.Var) -> tirx.Expr:
        x = qkv[t, h, i].astype("float32")
        cos, sin, lets = cos_sin(positions[t], i)
        partner = tirx.if_then_else(i < half, -qkv[t, h, i + half], qkv[t, h, i - half])
        # The frequency variables substituted, not bound by a Let: bfloat16 legalization
        # copies the expression it rounds, and VectorizeLoop refuses a variable bound twice.
        analyzer = sym.Analyzer()
        for var, value in lets.items():
            analyzer.bind(var, value)
        cos, sin = analyzer.simplify(cos), analyzer.simplify(sin)
        rotated = (x * cos + partner.astype("float32") * sin).astype(qkv.dtype)
        return tirx.if_then_else(
            tirx.all(h < num_rotated_heads, i < rotary_dim), rotated, qkv[t, h, i]
        )

    return te.compute(qkv.shape, rotate, name="rope")


def _longrope_cos_sin(pos, i, spec: RopeSpec, factors: te.Tensor, rotary_dim: int):
    """Phi-3 LongRoPE: per-frequency divisors, long ones once a position passes the original
    context, and cos/sin scaled by the attention factor."""
    s = spec.scaling
    original = int(s["original_max_position_embeddings"])
    half = rotary_dim // 2
    j = i % half
    # Per token: long factors once position + 1 > original, whatever the batch or chunking.
    # This equals transformers' forward with a KV cache token by token. transformers picks one
    # table per forward call (so a prompt crossing the original context is rotated all-long), and
    # its `generate` recomputes the whole sequence with the long table at the crossing; no KV-cache
    # engine reproduces that (tokens agree until the sequence passes the original context).
    table = tirx.if_then_else(pos + 1 > original, 1, 0)
    exponent = (j * 2).astype("float32") / float(rotary_dim)
    inv_freq = 1.0 / (factors[table, j] * tirx.power(tirx.const(spec.theta, "float32"), exponent))
    angle = pos.astype("float32") * inv_freq
    factor = float(s["attention_factor"])
    return tirx.cos(angle) * factor, tirx.sin(angle) * factor


@T.macro(hygienic=False)
def _split_token(qkv, q, k, v, s, apply_rope, position_map, angle_value, half, rotary_dim):
    """Token s of qkv into q, k, v; q and k rotated by `angle_value`'s cos/sin when apply_rope."""
    with T.sblock("token"):
        T.reads()
        T.writes()
        cos_t = T.sblock_alloc_buffer((max(half, 1),), "float32")
        sin_t = T.sblock_alloc_buffer((max(half, 1),), "float32")
        if apply_rope > 0:
            for i in T.serial(half):
                cos_t[i] = angle_value(position_map[s], i, 0)
                sin_t[i] = angle_value(position_map[s], i, 1)
        _rotate_heads(qkv, q, 0, s, apply_rope > 0, cos_t, sin_t, half, rotary_dim)
        _rotate_heads(qkv, k, q.shape[1], s, apply_rope > 0, cos_t, sin_t, half, rotary_dim)
        _rotate_heads(qkv, v, q.shape[1] + k.shape[1], s, False, cos_t, sin_t, half, rotary_dim)


@T.macro(hygienic=False)
def _rotate_heads(src, dst, src_head, s, rotate, cos_t, sin_t, half, rotary_dim):
    """dst[s] = heads src_head ... of src[s], rotated (rotate-half, as TVM's kernel) if `rotate`."""
    for h in T.serial(dst.shape[1]):
        if rotate:
            for i in T.vectorized(half):
                dst[s, h, i] = T.cast(
                    cos_t[i] * T.cast(src[s, src_head + h, i], "float32")
                    + sin_t[i] * T.cast(-src[s, src_head + h, i + half], "float32"),
                    dst.dtype,
                )
                dst[s, h, i + half] = T.cast(
                    cos_t[i] * T.cast(src[s, src_head + h, i + half], "float32")
                    + sin_t[i] * T.cast(src[s, src_head + h, i], "float32"),
                    dst.dtype,
                )
            if int(dst.shape[2]) > rotary_dim:  # partial rotary: the rest passes through
                for i in T.vectorized(int(dst.shape[2]) - rotary_dim):
                    dst[s, h, rotary_dim + i] = src[s, src_head + h, rotary_dim + i]
        else:
            for i in T.vectorized(dst.shape[2]):
                dst[s, h, i] = src[s, src_head + h, i]


def rope_angles(spec: RopeSpec | None, head_dim: int):
    """(angle_value, half, rotary_dim) for `split_token`: angle_value(pos, i, which) is the cos
    (which=0) or sin (1) of frequency i at pos, as the cache's RoPE (not LongRoPE) computes it."""
    rotary_dim = (spec.rotary_dim or head_dim) if spec else head_dim
    scale = 1.0 / spec.scale if spec else 1.0
    theta = spec.theta if spec else 10000.0
    freq_func = switch_rope_freq_func(dict(spec.scaling) if spec else {})

    def angle_value(pos: tirx.Expr, i: tirx.Expr, which: int) -> tirx.Expr:
        # its variables bound in the expression
        cos_sin_lets = freq_func(
            pos.astype("float32") * T.float32(scale), i, rotary_dim, theta, "float32"
        )
        value = cos_sin_lets[which]
        for var, bound in cos_sin_lets[2].items():
            value = tirx.Let(var, bound, value)
        return value

    return angle_value, rotary_dim // 2, rotary_dim


split_token = _split_token  # for kernels that rotate a token on the way elsewhere (kv_quant.py)


def split_rotary_cpu(
    spec: RopeSpec | None, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str
) -> tirx.PrimFunc:
    """The paged KV cache's `tir_split_rotary` for CPUs: qkv [tokens, heads, head_dim] split into
    q, k, v with q and k rotated at the cache's positions (when `apply_rope`).

    TVM's kernel runs serially and evaluates pow, cos and sin for every element of every head;
    this one computes each token's cos/sin once (the same frequency functions, so the same
    numbers) and rotates its heads in vectors, tokens in parallel. `spec` is the cache's RoPE
    (`rope_scale` there is 1 / spec.scale); None when the cache applies none.
    """
    angle_value, half, rotary_dim = rope_angles(spec, head_dim)
    h_q, h_kv, d = num_q_heads, num_kv_heads, head_dim

    @T.prim_func(s_tir=True)
    def split_rotary(
        var_qkv: T.handle,
        var_position_map: T.handle,
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        seq_len = T.int32()
        position_map_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, h_q + 2 * h_kv, d), dtype)
        q = T.match_buffer(var_q, (seq_len, h_q, d), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, d), dtype)
        position_map = T.match_buffer(
            var_position_map, (seq_len,), "int32", elem_offset=position_map_offset
        )
        # One decode token: a parallel launch would cost more than the token.
        if seq_len == 1:
            _split_token(qkv, q, k, v, 0, apply_rope, position_map, angle_value, half, rotary_dim)
        else:
            for s in T.parallel(seq_len):
                _split_token(
                    qkv, q, k, v, s, apply_rope, position_map, angle_value, half, rotary_dim
                )

    return split_rotary

"""Rotary embedding computed in the graph, for attention whose KV cache cannot apply it.

One paged KV cache applies one RoPE to every layer, from its own positions. Models whose layers
differ (Gemma 3: local and global bases) or whose RoPE the cache gets wrong (Phi-3 LongRoPE)
get a cache without RoPE, and `LowerAttentionToPagedKV` rotates q and k here first, at the
positions the cache reports. Frequencies follow transformers (`modeling_rope_utils`).
"""

from tvm import te, tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func

from relaxlm.frontends.ops import RopeSpec


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
        rotated = (x * cos + partner.astype("float32") * sin).astype(qkv.dtype)
        for var, value in lets.items():  # bound once: TIR allows one definition per variable
            rotated = tirx.Let(var, value, rotated)
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

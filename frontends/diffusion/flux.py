"""diffusers' `FluxTransformer2DModel`: packed latent tokens and T5 text tokens, conditioned on
timestep, guidance and CLIP's pooled text through AdaLayerNorm-Zero modulation; double-stream
(joint) blocks, then single-stream blocks over text + image, with 3-axis rotary embeddings.

The rotary tables (cos, sin over the text + image ids) are inputs: the runtime builds them from
the ids as FluxPipeline does, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .blocks import _Dropout
from .unet import TimestepEmbedding

EPS = 1e-6  # every norm of the FLUX transformer


@dataclass
class FluxTransformerConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FluxTransformerConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        cfg = cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )
        if cfg.patch_size != 1:
            raise RelaxlmError(
                f"FluxTransformer2DModel patch_size {cfg.patch_size} is not supported (1: the "
                "pipeline packs 2x2 latent patches itself)"
            )
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise RelaxlmError(
                f"axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim "
                f"{cfg.attention_head_dim}"
            )
        return cfg


def _modulate(x: nn.Tensor, shift: nn.Tensor, scale: nn.Tensor) -> nn.Tensor:
    """x * (1 + scale) + shift, with [b, dim] modulation broadcast over tokens."""
    b, d = scale.shape
    return x * (nn.op.reshape(scale, [b, 1, d]) + 1.0) + nn.op.reshape(shift, [b, 1, d])


def _gated(gate: nn.Tensor, x: nn.Tensor) -> nn.Tensor:
    b, d = gate.shape
    return nn.op.reshape(gate, [b, 1, d]) * x


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """Timestep (x1000), guidance (x1000, FLUX-dev) and pooled-text embeddings, summed."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.guidance_embedder = TimestepEmbedding(256, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # PixArt's projection: the same

    def forward(self, timestep, guidance, pooled) -> nn.Tensor:
        def proj(t):  # diffusers' Timesteps(256, flip_sin_to_cos=True, shift 0)
            return nn.op.get_timestep_embedding(
                t, 256, flip_sin_to_cos=True, downscale_freq_shift=0
            ).astype(pooled.dtype)

        emb = self.timestep_embedder(proj(timestep * 1000.0))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(proj(guidance * 1000.0))
        return emb + self.text_embedder(pooled)


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim: int, chunks: int):
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, EPS, elementwise_affine=False)
        self.chunks = chunks

    def forward(self, x: nn.Tensor, temb: nn.Tensor) -> tuple[nn.Tensor, list[nn.Tensor]]:
        """The modulated x, then the rest: (gate) or (gate, shift_mlp, scale_mlp, gate_mlp)."""
        shift, scale, *rest = nn.op.split(self.linear(nn.op.silu(temb)), self.chunks, axis=1)
        return _modulate(self.norm(x), shift, scale), rest


def _rope(x: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor) -> nn.Tensor:
    """Rotate interleaved pairs (x0, x1) of [b, s, heads, d] by the [s, d] float32 tables,
    in float32 as diffusers does."""
    b, s, h, d = x.shape
    dtype, x = x.dtype, x.astype("float32")
    real, imag = nn.op.split(nn.op.reshape(x, [b, s, h, d // 2, 2]), 2, axis=-1)
    rotated = nn.op.reshape(nn.op.concat([imag * -1.0, real], dim=-1), [b, s, h, d])
    cos, sin = nn.op.reshape(cos, [1, s, 1, d]), nn.op.reshape(sin, [1, s, 1, d])
    return (x * cos + rotated * sin).astype(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        self.weight = nn.Parameter((dim,))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.rms_norm(x, self.weight, axes=-1, epsilon=EPS)


class FluxAttention(nn.Module):
    """Self-attention with RMS-normed q, k; `context` (joint blocks) adds its own projections,
    its tokens placed before the image's."""

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool):
        self.heads, self.head_dim = heads, head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, dim) for _ in range(3)
            )
            self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, t: nn.Tensor) -> nn.Tensor:
        return nn.op.reshape(t, [t.shape[0], t.shape[1], self.heads, self.head_dim])

    def forward(self, x, cos, sin, context=None):
        q = self.norm_q(self._heads(self.to_q(x)))  # [b, s, heads, head_dim]
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if context is not None:
            q = nn.op.concat([self.norm_added_q(self._heads(self.add_q_proj(context))), q], dim=1)
            k = nn.op.concat([self.norm_added_k(self._heads(self.add_k_proj(context))), k], dim=1)
            v = nn.op.concat([self._heads(self.add_v_proj(context)), v], dim=1)
        out = nn.op.scaled_dot_product_attention(_rope(q, cos, sin), _rope(k, cos, sin), v)
        b, s = out.shape[0], out.shape[1]
        out = nn.op.reshape(out, [b, s, self.heads * self.head_dim])
        if context is None:
            return out
        text = context.shape[1]
        ctx_out, img_out = nn.op.split(out, [text], axis=1)
        return self.to_out[0](img_out), self.to_add_out(ctx_out)


class _GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        self.net = nn.ModuleList([_GELUProj(dim, dim * 4), _Dropout(), nn.Linear(dim * 4, dim)])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.net[2](self.net[0](x))


class FluxTransformerBlock(nn.Module):
    """Double-stream block: image and text keep their own weights and share one attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        self.norm1 = AdaLayerNormZero(dim, 6)
        self.norm1_context = AdaLayerNormZero(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True)
        self.norm2 = nn.LayerNorm(dim, EPS, elementwise_affine=False)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, EPS, elementwise_affine=False)
        self.ff_context = FeedForward(dim)

    def forward(self, x, context, temb, cos, sin):
        nx, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)
        nc, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, temb)
        attn, ctx_attn = self.attn(nx, cos, sin, nc)
        x = x + _gated(gate, attn)
        x = x + _gated(gate_mlp, self.ff(_modulate(self.norm2(x), shift_mlp, scale_mlp)))
        context = context + _gated(c_gate, ctx_attn)
        ff = self.ff_context(_modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return x, context + _gated(c_gate_mlp, ff)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over [text; image]: attention and MLP in parallel, one output
    projection."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        self.norm = AdaLayerNormZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, dim * 4)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False)
        self.proj_out = nn.Linear(dim * 5, dim)

    def forward(self, x, temb, cos, sin):
        nx, (gate,) = self.norm(x, temb)
        mlp = nn.op.gelu(self.proj_mlp(nx), approximate="tanh")
        out = self.proj_out(nn.op.concat([self.attn(nx, cos, sin), mlp], dim=2))
        return x + _gated(gate, out)


class AdaLayerNormContinuous(nn.Module):
    def __init__(self, dim: int):
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, EPS, elementwise_affine=False)

    def forward(self, x: nn.Tensor, temb: nn.Tensor) -> nn.Tensor:
        scale, shift = nn.op.split(self.linear(nn.op.silu(temb)), 2, axis=1)  # scale first here
        return _modulate(self.norm(x), shift, scale)


class FluxTransformer2DModel(nn.Module):
    def __init__(self, c: FluxTransformerConfig):
        self.config = c
        dim, heads, head_dim = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            dim, c.pooled_projection_dim, c.guidance_embeds
        )
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, heads, head_dim) for _ in range(c.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(c.num_single_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, c.out_channels or c.in_channels)

    def forward(self, hidden_states, context, pooled, timestep, guidance, rope_cos, rope_sin):
        """[b, image tokens, in_channels] packed latents, [b, text tokens, joint_attention_dim]
        T5 states, [b, pooled_dim] CLIP pooled states, [b] sigmas (timestep / 1000), [b]
        guidance scales (ignored without guidance_embeds), [text + image tokens, head_dim]
        rotary tables -> [b, image tokens, out_channels] velocity."""
        temb = self.time_text_embed(timestep, guidance, pooled)
        x = self.x_embedder(hidden_states)
        context = self.context_embedder(context)
        for block in self.transformer_blocks:
            x, context = block(x, context, temb, rope_cos, rope_sin)
        text = context.shape[1]
        x = nn.op.concat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope_cos, rope_sin)
        x = nn.op.split(x, [text], axis=1)[1]
        return self.proj_out(self.norm_out(x, temb))

"""The diffusers building blocks that the UNet and the VAE decoder share, named as diffusers
names them (`norm1`, `conv1`, `to_q`, `to_out.0`, `ff.net.0.proj`, ...)."""

from __future__ import annotations

from tvm.relax.frontend import nn


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that also takes bfloat16, which Relax's group_norm refuses: normalized in
    float32 (bfloat16 has float32's range) and rounded once, as for LayerNorm on CPUs."""

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if x.dtype != "bfloat16":
            return super().forward(x)
        weight, bias = self.weight.astype("float32"), self.bias.astype("float32")
        y = nn.op.group_norm(x.astype("float32"), self.num_groups, weight, bias, self.eps)
        return y.astype("bfloat16")


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2D:
    return nn.Conv2D(cin, cout, kernel, stride=stride, padding=kernel // 2)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, eps: float, temb: int | None = None):
        self.norm1 = GroupNorm(groups, cin, eps)
        self.conv1 = _conv(cin, cout)
        self.time_emb_proj = nn.Linear(temb, cout) if temb else None
        self.norm2 = GroupNorm(groups, cout, eps)
        self.conv2 = _conv(cout, cout)
        self.conv_shortcut = _conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: nn.Tensor, temb: nn.Tensor | None = None) -> nn.Tensor:
        h = self.conv1(nn.op.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(nn.op.silu(temb))
            h = h + nn.op.reshape(t, [*t.shape, 1, 1])
        h = self.conv2(nn.op.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nn.Module):
    """Multi-head attention over [batch, tokens, dim]; `context` gives keys and values."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        bias: bool = False,
    ):
        inner, context_dim = heads * head_dim, context_dim or dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: nn.Tensor, context: nn.Tensor | None = None) -> nn.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        split = lambda t: nn.op.reshape(t, [b, t.shape[1], self.heads, self.head_dim])  # noqa: E731
        out = nn.op.scaled_dot_product_attention(
            split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        )
        return self.to_out[0](nn.op.reshape(out, [b, x.shape[1], self.heads * self.head_dim]))


def _tokens(x: nn.Tensor) -> nn.Tensor:
    """[b, c, h, w] -> [b, h*w, c]"""
    b, c, h, w = x.shape
    return nn.op.permute_dims(nn.op.reshape(x, [b, c, h * w]), [0, 2, 1])


def _image(x: nn.Tensor, h, w) -> nn.Tensor:
    """[b, h*w, c] -> [b, c, h, w]"""
    b, _, c = x.shape
    return nn.op.reshape(nn.op.permute_dims(x, [0, 2, 1]), [b, c, h, w])


class SpatialAttention(Attention):
    """The VAE's single-head self-attention over pixels: group norm, attention, residual."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__(channels, 1, channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        h, w = x.shape[2], x.shape[3]
        return x + _image(super().forward(_tokens(self.group_norm(x))), h, w)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        hidden, gate = nn.op.split(self.proj(x), 2, axis=-1)
        return hidden * nn.op.gelu(gate)


class _Dropout(nn.Module):
    """Holds `ff.net.1`'s place (dropout: nothing at inference)."""

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return x


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), _Dropout(), nn.Linear(dim * 4, dim)])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: nn.Tensor, context: nn.Tensor) -> nn.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        groups: int,
        linear_proj: bool,
        layers: int = 1,
    ):
        head_dim = channels // heads
        self.linear_proj = linear_proj
        self.norm = GroupNorm(groups, channels, 1e-6)
        self.proj_in = (
            nn.Linear(channels, channels) if linear_proj else _conv(channels, channels, 1)
        )
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, head_dim, context_dim) for _ in range(layers)]
        )
        self.proj_out = (
            nn.Linear(channels, channels) if linear_proj else _conv(channels, channels, 1)
        )

    def forward(self, x: nn.Tensor, context: nn.Tensor) -> nn.Tensor:
        h, w = x.shape[2], x.shape[3]
        t = self.norm(x)
        t = self.proj_in(_tokens(t)) if self.linear_proj else _tokens(self.proj_in(t))
        for block in self.transformer_blocks:
            t = block(t, context)
        t = _image(self.proj_out(t), h, w) if self.linear_proj else self.proj_out(_image(t, h, w))
        return x + t


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        self.conv = _conv(channels, channels, 3, stride=2)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        self.conv = _conv(channels, channels)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        # nearest-neighbour 2x, as torch's interpolate: each pixel repeated along h and w
        return self.conv(nn.op.repeat(nn.op.repeat(x, 2, axis=2), 2, axis=3))

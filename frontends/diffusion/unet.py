"""diffusers' `UNet2DConditionModel` as Stable Diffusion 1.x/2.x configure it: the noise
predictor, conditioned on the timestep and the CLIP text states by cross-attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from .blocks import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    _conv,
)


@dataclass
class UNet2DConditionConfig:
    block_out_channels: list[int]
    down_block_types: list[str]
    up_block_types: list[str]
    cross_attention_dim: int
    attention_head_dim: int | list[int] = 8
    num_attention_heads: int | list[int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = False
    transformer_layers_per_block: int = 1
    sample_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UNet2DConditionConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def heads(self) -> list[int]:
        """Heads per down block. SD's configs name the head count `attention_head_dim` (a
        diffusers quirk it keeps for compatibility); `num_attention_heads` wins when set."""
        n = self.num_attention_heads or self.attention_head_dim
        return list(n) if isinstance(n, list | tuple) else [n] * len(self.block_out_channels)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.linear_2(nn.op.silu(self.linear_1(x)))


class _Block(nn.Module):
    """A down or up block: resnets, each optionally followed by a transformer, then a resampler."""

    def __init__(
        self,
        c: UNet2DConditionConfig,
        ins: list[int],
        cout: int,
        heads: int,
        cross: bool,
        temb: int,
    ):
        groups, eps = c.norm_num_groups, c.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock2D(cin, cout, groups, eps, temb) for cin in ins])
        self.attentions = (
            nn.ModuleList(
                [
                    Transformer2DModel(
                        cout,
                        heads,
                        c.cross_attention_dim,
                        groups,
                        c.use_linear_projection,
                        c.transformer_layers_per_block,
                    )
                    for _ in ins
                ]
            )
            if cross
            else None
        )


class DownBlock(_Block):
    def __init__(self, c, cin, cout, heads, cross, temb, downsample):
        super().__init__(c, [cin] + [cout] * (c.layers_per_block - 1), cout, heads, cross, temb)
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x, temb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock(_Block):
    def __init__(self, c, ins, cout, heads, cross, temb, upsample):
        super().__init__(c, ins, cout, heads, cross, temb)
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x, temb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            x = resnet(nn.op.concat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, c: UNet2DConditionConfig, channels: int, heads: int, temb: int):
        groups, eps = c.norm_num_groups, c.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, groups, eps, temb) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [
                Transformer2DModel(
                    channels,
                    heads,
                    c.cross_attention_dim,
                    groups,
                    c.use_linear_projection,
                    c.transformer_layers_per_block,
                )
            ]
        )

    def forward(self, x, temb, context):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, temb), context), temb)


def _cross(kind: str) -> bool:
    if kind not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
        raise ValueError(f"UNet block type {kind!r} is not supported")
    return kind.startswith("CrossAttn")


class UNet2DConditionModel(nn.Module):
    def __init__(self, c: UNet2DConditionConfig):
        self.config = c
        chans, heads, n = c.block_out_channels, c.heads(), len(c.block_out_channels)
        temb = chans[0] * 4
        self.conv_in = _conv(c.in_channels, chans[0])
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(c, chans[max(i - 1, 0)], cout, heads[i], _cross(kind), temb, i < n - 1)
                for i, (kind, cout) in enumerate(zip(c.down_block_types, chans, strict=True))
            ]
        )
        self.mid_block = UNetMidBlock2DCrossAttn(c, chans[-1], heads[-1], temb)
        rchans, rheads, ups = list(reversed(chans)), list(reversed(heads)), []
        for i, kind in enumerate(c.up_block_types):
            prev, cout, skip_in = rchans[max(i - 1, 0)], rchans[i], rchans[min(i + 1, n - 1)]
            layers = c.layers_per_block + 1
            ins = [
                (prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout)
                for j in range(layers)
            ]
            ups.append(UpBlock(c, ins, cout, rheads[i], _cross(kind), temb, i < n - 1))
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, chans[0], c.norm_eps)
        self.conv_out = _conv(chans[0], c.out_channels)

    def forward(self, sample: nn.Tensor, timestep: nn.Tensor, context: nn.Tensor) -> nn.Tensor:
        """[b, 4, h, w] latents, [b] float32 timesteps, [b, 77, d] text states -> [b, 4, h, w]."""
        c = self.config
        t = nn.op.get_timestep_embedding(
            timestep,
            c.block_out_channels[0],
            flip_sin_to_cos=c.flip_sin_to_cos,
            downscale_freq_shift=c.freq_shift,
        )
        temb = self.time_embedding(t.astype(sample.dtype))
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block(x, temb, context, skips)
        return self.conv_out(nn.op.silu(self.conv_norm_out(x)))

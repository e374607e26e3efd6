"""The decoder half of diffusers' `AutoencoderKL`: latents -> image in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from .blocks import GroupNorm, ResnetBlock2D, SpatialAttention, Upsample2D, _conv

EPS = 1e-6  # AutoencoderKL's norms


@dataclass
class AutoencoderKLConfig:
    block_out_channels: list[int]
    latent_channels: int = 4
    out_channels: int = 3
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # FLUX: latents / scaling_factor + shift_factor
    use_post_quant_conv: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side: one 2x upsampler per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AutoencoderKLConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int):
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, groups, EPS) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups, EPS)])

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if j == 0 else cout, cout, groups, EPS) for j in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderKLConfig):
        channels = list(reversed(c.block_out_channels))
        self.conv_in = _conv(c.latent_channels, channels[0])
        self.mid_block = UNetMidBlock2D(channels[0], c.norm_num_groups)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(
                    channels[max(i - 1, 0)],
                    cout,
                    c.layers_per_block + 1,
                    c.norm_num_groups,
                    i < len(channels) - 1,
                )
                for i, cout in enumerate(channels)
            ]
        )
        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels[-1], EPS)
        self.conv_out = _conv(channels[-1], c.out_channels)

    def forward(self, z: nn.Tensor) -> nn.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.op.silu(self.conv_norm_out(x)))


class AutoencoderKLDecoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        self.config = config
        self.post_quant_conv = (
            _conv(config.latent_channels, config.latent_channels, 1)
            if config.use_post_quant_conv
            else None
        )
        self.decoder = Decoder(config)

    def forward(self, latents: nn.Tensor) -> nn.Tensor:
        """[batch, 4, h/8, w/8] latents (already divided by scaling_factor) -> [batch, 3, h, w]."""
        z = self.post_quant_conv(latents) if self.post_quant_conv is not None else latents
        return self.decoder(z)

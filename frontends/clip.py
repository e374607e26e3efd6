"""CLIP's transformer layer, shared by its vision tower (LLaVA, frontends/llava.py) and its text
encoder (Stable Diffusion and FLUX, frontends/diffusion/clip_text.py): pre-norm attention and a
two-layer MLP under the checkpoint's names (`layer_norm1`, `self_attn`, `layer_norm2`,
`mlp.fc1`, `mlp.fc2`). The attention is the caller's: causal over text, bidirectional over
image patches.
"""

from __future__ import annotations

from typing import Protocol

from tvm.relax.frontend import nn

from .config import activation


class CLIPLayerConfig(Protocol):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPLayerConfig, act_key: str):
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(act_key, config.hidden_act)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """act_key: where config.json holds hidden_act, for the error on an unknown one."""

    def __init__(self, config: CLIPLayerConfig, self_attn: nn.Module, act_key: str):
        eps = config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps)
        self.self_attn = self_attn
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps)
        self.mlp = CLIPMLP(config, act_key)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

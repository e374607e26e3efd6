"""CLIP text encoder (transformers `CLIPTextModel`), the prompt encoder of Stable Diffusion.

Parameter names equal the checkpoint's (`text_model.encoder.layers.N.self_attn.q_proj...`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from ..clip import CLIPEncoderLayer


@dataclass
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CLIPTextConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        seq = input_ids.shape[1]
        positions = nn.op.arange(0, seq, dtype="int32")
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, h = x.shape
        split = lambda t: nn.op.reshape(t, [b, s, self.heads, h // self.heads])  # noqa: E731
        out = nn.op.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(nn.op.reshape(out, [b, s, h]))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        self.layers = nn.ModuleList(
            [
                CLIPEncoderLayer(config, CLIPAttention(config), "hidden_act")
                for _ in range(config.num_hidden_layers)
            ]
        )


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        """[batch, 77] int32 ids -> [batch, 77, hidden]: the last hidden state SD conditions on."""
        return self.text_model(input_ids)

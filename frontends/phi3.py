"""Phi-3: Llama with fused projections, partial rotary and LongRoPE.

- `qkv_proj` [(q_heads + 2 * kv_heads) * head_dim, hidden] holds q, k and v rows in that order,
  which is already the attention op's fused layout
- `gate_up_proj` [2 * intermediate, hidden]: gate rows, then up rows
- `partial_rotary_factor` (Phi-3.5/4-mini) and LongRoPE (`rope_type` "longrope", or "su" in
  older configs; short and long per-frequency factors, see compiler/rope.py)
- `sliding_window` on every layer when set
"""

from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn

from .llama import LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


@dataclass
class Phi3Config(LlamaConfig):
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Phi3Config":
        # As transformers' Phi3Config: `rope_scaling` first, and "su"/"yarn" mean LongRoPE.
        rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
        if rope.get("rope_type", rope.get("type")) in ("su", "yarn"):
            rope["rope_type"] = "longrope"
        return super().from_dict({**raw, "rope_parameters": rope, "rope_scaling": None})


class Phi3Attention(LlamaAttention):
    def __init__(self, config: Phi3Config, layer_id: int):
        super().__init__(config, layer_id)
        del self.q_proj, self.k_proj, self.v_proj
        fused = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, fused, bias=False)

    def project_qkv(self, x: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        heads = self.num_q_heads + 2 * self.num_kv_heads
        return nn.op.reshape(self.qkv_proj(x), (b, s, heads, self.head_dim))


class Phi3MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.op.silu(gate) * up)


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP


class Phi3Model(LlamaModel):
    layer_class = Phi3DecoderLayer


class Phi3ForCausalLM(LlamaForCausalLM):
    model_class = Phi3Model

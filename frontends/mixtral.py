"""Mixtral: Llama (Mistral) with a sparse mixture-of-experts MLP in every layer.

The MLP is `block_sparse_moe`: router `gate` [E, hidden], experts `w1` (gate), `w3` (up) and
`w2` (down), top-k routing with the top-k probabilities renormalised to sum to one.
"""

from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from .moe import SparseMoE


@dataclass
class MixtralConfig(LlamaConfig):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MixtralConfig":
        config = super().from_dict(raw)
        if not 1 <= config.num_experts_per_tok <= config.num_local_experts:
            raise RelaxlmError(
                f"config.json: num_experts_per_tok {config.num_experts_per_tok} must be between "
                f"1 and num_local_experts {config.num_local_experts}"
            )
        return config


class MixtralDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: MixtralConfig, layer_id: int):
        super().__init__(config, layer_id)
        del self.mlp
        self.block_sparse_moe = SparseMoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            normalize_top_k=True,
            names=("w1", "w3", "w2"),
        )

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralModel(LlamaModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_class = MixtralModel

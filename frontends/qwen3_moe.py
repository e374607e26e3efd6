"""Qwen3-MoE: Qwen3 (q/k RMSNorm) with sparse mixture-of-experts MLPs.

Layer i has the experts (`mlp.gate`, `mlp.experts.{gate,up,down}_proj`) when it is not in
`mlp_only_layers` and (i + 1) is a multiple of `decoder_sparse_step`; otherwise a dense MLP of
`intermediate_size`. Top-k probabilities are renormalised only if `norm_topk_prob`.
"""

from dataclasses import dataclass, field
from typing import Any

from relaxlm.errors import RelaxlmError

from .llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from .moe import SparseMoE
from .qwen3 import Qwen3DecoderLayer


@dataclass
class Qwen3MoeConfig(LlamaConfig):
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen3MoeConfig":
        # transformers 5 writes num_experts as num_local_experts.
        experts = raw.get("num_experts") or raw.get("num_local_experts")
        config = super().from_dict({**raw, "num_experts": experts} if experts else raw)
        if not 1 <= config.num_experts_per_tok <= config.num_experts:
            raise RelaxlmError(
                f"config.json: num_experts_per_tok {config.num_experts_per_tok} must be between "
                f"1 and num_experts {config.num_experts}"
            )
        return config

    def is_sparse(self, layer_id: int) -> bool:
        return (
            layer_id not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def __init__(self, config: Qwen3MoeConfig, layer_id: int):
        super().__init__(config, layer_id)
        if config.is_sparse(layer_id):
            self.mlp = SparseMoE(
                config.hidden_size,
                config.moe_intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                normalize_top_k=config.norm_topk_prob,
                names=("gate_proj", "up_proj", "down_proj"),
            )


class Qwen3MoeModel(LlamaModel):
    layer_class = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    model_class = Qwen3MoeModel

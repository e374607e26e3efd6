"""Gemma 3 (text): Gemma 2 with q/k norms, and RoPE bases per layer type.

- RMSNorm (1 + w) over head_dim on every q and k head, before RoPE
- sliding layers use the local RoPE base (10k), full layers the global one (1M, with any
  scaling); transformers 5 keeps both in `rope_parameters`, older configs in `rope_theta`,
  `rope_scaling` (global) and `rope_local_base_freq`
- five sliding layers to one full by default (`sliding_window_pattern`, or `layer_types`)
- no soft-capping unless config.json asks for it
"""

from dataclasses import dataclass, field
from typing import Any

from .config import from_config, layer_windows, rope_from_config
from .gemma2 import (
    Gemma2Attention,
    Gemma2Config,
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
    GemmaRMSNorm,
)
from .ops import RopeSpec
from .qwen3 import Qwen3Attention


@dataclass
class Gemma3Config(Gemma2Config):
    max_position_embeddings: int = 131072
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window_pattern: int = 6
    # Derived: RoPE of the sliding layers (`rope` is the full layers').
    local_rope: RopeSpec = field(default_factory=RopeSpec)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Gemma3Config":
        heads, layers = raw["num_attention_heads"], raw["num_hidden_layers"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        pattern = raw.get("sliding_window_pattern") or cls.sliding_window_pattern
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        ]
        full, local = cls._rope_parameters(raw)
        config = from_config(
            cls,
            raw,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            layer_types=types,
            rope=rope_from_config(raw, head_dim, full),
            local_rope=rope_from_config(raw, head_dim, local),
            layer_windows=layer_windows(
                {"sliding_window": cls.sliding_window, **raw, "layer_types": types}, layers
            ),
        )
        config.o_proj_bias = config.attention_bias
        config.check()
        return config

    @staticmethod
    def _rope_parameters(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(full-attention, sliding-attention) rope parameters, new or old config keys."""
        params = raw.get("rope_parameters") or {}
        if "full_attention" in params:
            return params["full_attention"], params.get("sliding_attention", {})
        full = {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta", 1e6)}
        return full, {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}


class Gemma3Attention(Gemma2Attention):
    def __init__(self, config: Gemma3Config, layer_id: int):
        super().__init__(config, layer_id)
        if config.layer_types[layer_id] == "sliding_attention":
            self.rope = config.local_rope
        d, eps = config.head_dim, config.rms_norm_eps
        self.q_norm = GemmaRMSNorm(d, eps)
        self.k_norm = GemmaRMSNorm(d, eps)

    # q/k normed per head before RoPE, exactly as Qwen3 (only the norm class differs)
    project_qkv = Qwen3Attention.project_qkv


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_class = Gemma3Attention


class Gemma3Model(Gemma2Model):
    layer_class = Gemma3DecoderLayer


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_class = Gemma3Model

"""Gemma 2: Llama's modules with Gemma's numerics.

- embeddings scaled by sqrt(hidden_size); RMSNorm weights stored as offsets from 1, `x * (1 + w)`
- four norms per layer: around attention (input, post_attention) and around the MLP
  (pre_feedforward, post_feedforward), the post norms applied before each residual add
- gelu (tanh) MLP; attention scaled by query_pre_attn_scalar^-0.5, not head_dim^-0.5
- attention logits soft-capped (`attn_logit_softcapping`), and the final logits too
  (`final_logit_softcapping`): `cap * tanh(x / cap)`
- a sliding window on alternate layers (`layer_types`; by default layers 0, 2, 4, ... slide)
"""

import math
from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import activation, from_config, layer_windows, rope_from_config
from .llama import LlamaAttention, LlamaConfig, LlamaForCausalLM, LlamaMLP, LlamaModel


@dataclass
class Gemma2Config(LlamaConfig):
    # Defaults are transformers' Gemma2Config's, for checkpoints that leave keys out.
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    use_bidirectional_attention: bool | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Gemma2Config":
        heads, layers = raw["num_attention_heads"], raw["num_hidden_layers"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        config = from_config(
            cls,
            raw,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=rope_from_config(raw, head_dim),
            layer_windows=cls._windows(raw, layers),
        )
        config.o_proj_bias = config.attention_bias
        config.check()
        return config

    @classmethod
    def _windows(cls, raw: dict[str, Any], layers: int) -> list[int]:
        pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return layer_windows({"sliding_window": cls.sliding_window, **raw}, layers, pattern)

    def check(self) -> None:
        """RelaxlmError for what config.json asks and relaxlm does not implement."""
        activation("hidden_activation", self.hidden_activation)
        if self.use_bidirectional_attention:
            raise RelaxlmError("config.json: use_bidirectional_attention is not supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise RelaxlmError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )


class GemmaRMSNorm(nn.Module):
    """RMSNorm whose stored weight w scales by (1 + w)."""

    def __init__(self, dim: int, eps: float):
        self.weight = nn.Parameter((dim,))
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if x.dtype == "float32":
            return nn.op.rms_norm(x, self.weight + 1.0, axes=-1, epsilon=self.eps)
        # In float32 as transformers does: 1 + w rounded to 16 bits would lose w's small offsets.
        weight = self.weight.astype("float32") + 1.0
        return nn.op.rms_norm(x.astype("float32"), weight, axes=-1, epsilon=self.eps).astype(
            x.dtype
        )


class Gemma2Attention(LlamaAttention):
    def __init__(self, config: Gemma2Config, layer_id: int):
        super().__init__(config, layer_id)
        self.sm_scale = config.query_pre_attn_scalar**-0.5
        self.logit_softcap = config.attn_logit_softcapping or 0.0


class Gemma2MLP(LlamaMLP):
    def __init__(self, config: Gemma2Config):
        super().__init__(config)
        self.act = activation("hidden_activation", config.hidden_activation)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    attention_class = Gemma2Attention

    def __init__(self, config: Gemma2Config, layer_id: int):
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = self.attention_class(config, layer_id)
        self.mlp = Gemma2MLP(config)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(LlamaModel):
    layer_class = Gemma2DecoderLayer

    def __init__(self, config: Gemma2Config):
        super().__init__(config)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = math.sqrt(config.hidden_size)

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        # The scale is rounded to the weights' dtype, as transformers does (sqrt(3072) -> 55.5).
        return self.embed_tokens(input_ids) * self.embed_scale


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_class = Gemma2Model

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        logits = super().logits(hidden)
        cap = self.config.final_logit_softcapping
        return nn.op.tanh(logits / cap) * cap if cap else logits

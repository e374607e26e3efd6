"""Phi-1/1.5/2: parallel attention and MLP on one LayerNorm, partial rotary, biases everywhere.

Each layer computes `x + attn(ln(x)) + mlp(ln(x))` with a single `input_layernorm`; attention
projects with biased q/k/v_proj and `dense`, optionally LayerNorms each q and k head
(`qk_layernorm`), and rotates only the first `partial_rotary_factor` of each head. The MLP is
fc1 -> gelu -> fc2, and lm_head has a bias.
"""

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import activation, check_kv_heads, from_config, rope_from_config
from .entry import CausalLM
from .ops import RopeSpec, attention


@dataclass
class PhiConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    # Derived, not config.json keys:
    rope: RopeSpec = field(default_factory=RopeSpec)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PhiConfig":
        heads = raw["num_attention_heads"]
        head_dim = raw["hidden_size"] // heads
        raw = {"partial_rotary_factor": 0.5, **raw}  # transformers' PhiConfig default
        config = from_config(
            cls,
            raw,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            rope=rope_from_config(raw, head_dim),
        )
        activation("hidden_act", config.hidden_act)
        if config.tie_word_embeddings:
            raise RelaxlmError("config.json: tie_word_embeddings is not supported for Phi")
        check_kv_heads(config.num_attention_heads, config.num_key_value_heads)
        return config

    @property
    def context_window(self) -> int:
        return self.max_position_embeddings


class PhiAttention(nn.Module):
    def __init__(self, config: PhiConfig, layer_id: int):
        self.layer_id = layer_id
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.hidden_size // config.num_attention_heads
        self.rope = config.rope
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_q_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.dense = nn.Linear(self.num_q_heads * d, h, bias=True)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(d, config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(d, config.layer_norm_eps)
        self.qk_layernorm = config.qk_layernorm

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        q = nn.op.reshape(self.q_proj(x), (b, s, hq, d))
        k = nn.op.reshape(self.k_proj(x), (b, s, hkv, d))
        v = nn.op.reshape(self.v_proj(x), (b, s, hkv, d))
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        out = attention(
            nn.op.concat([q, k, v], dim=2),  # [b, s, hq + 2 * hkv, d]
            layer_id=self.layer_id,
            num_q_heads=hq,
            num_kv_heads=hkv,
            sm_scale=d**-0.5,
            rope=self.rope,
        )  # [b, s, hq, d]
        return self.dense(nn.op.reshape(out, (b, s, hq * d)))


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig):
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = activation("hidden_act", config.hidden_act)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: PhiConfig, layer_id: int):
        self.input_layernorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = PhiAttention(config, layer_id)
        self.mlp = PhiMLP(config)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h) + self.mlp(h)


class PhiModel(nn.Module):
    def __init__(self, config: PhiConfig):
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [PhiDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.final_layernorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)


class PhiForCausalLM(CausalLM):
    def __init__(self, config: PhiConfig):
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def hidden_states(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model(input_ids)

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        logits = self.lm_head(hidden)
        return logits.astype("float32") if logits.dtype != "float32" else logits

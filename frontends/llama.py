"""Llama, and the families that are Llama with small changes: Mistral, Qwen2.

Module tree and parameter names follow transformers' `LlamaForCausalLM`, so safetensors bind
by name. Qwen2 is Llama with a q/k/v bias (and sliding windows from `max_window_layers` on when
`use_sliding_window`); Mistral is Llama with a sliding window on every layer.

Other families subclass these modules: a decoder layer builds `attention_class`, a model builds
`layer_class`, a causal LM builds `model_class`.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import check_kv_heads, from_config, layer_windows, rope_from_config
from .entry import CausalLM
from .ops import RopeSpec, attention


@dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    # Derived, not config.json keys:
    rope: RopeSpec = field(default_factory=RopeSpec)
    layer_windows: list[int] = field(default_factory=list)  # per layer, 0 = full attention
    o_proj_bias: bool | None = None  # None: as attention_bias (Qwen2 has q/k/v bias only)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LlamaConfig":
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        config = from_config(
            cls,
            raw,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=rope_from_config(raw, head_dim),
            layer_windows=layer_windows(raw, raw["num_hidden_layers"]),
        )
        if config.o_proj_bias is None:
            config.o_proj_bias = config.attention_bias
        if config.hidden_act != "silu":
            raise RelaxlmError(f"config.json: hidden_act {config.hidden_act!r} is not supported")
        check_kv_heads(config.num_attention_heads, config.num_key_value_heads)
        return config

    @property
    def context_window(self) -> int:
        return self.max_position_embeddings


def qwen2_config(raw: dict[str, Any]) -> LlamaConfig:
    """Qwen2 is Llama with a bias on q, k and v only (config.json has no attention_bias key)."""
    return LlamaConfig.from_dict({**raw, "attention_bias": True, "o_proj_bias": False})


class LlamaAttention(nn.Module):
    # Set while an entry whose tokens form one bidirectional block is traced (Gemma 3's images).
    bidirectional = False

    def __init__(self, config: LlamaConfig, layer_id: int):
        self.layer_id = layer_id
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope = config.rope
        self.sm_scale = 1.0 / math.sqrt(config.head_dim)
        self.sliding_window = config.layer_windows[layer_id] if config.layer_windows else 0
        self.logit_softcap = 0.0
        d, bias = config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_q_heads * d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * d, bias=bias)
        o_bias = bias if config.o_proj_bias is None else config.o_proj_bias
        self.o_proj = nn.Linear(self.num_q_heads * d, config.hidden_size, bias=o_bias)

    def project_qkv(self, x: nn.Tensor) -> nn.Tensor:
        """[b, s, hidden] -> fused [b, s, q_heads + 2 * kv_heads, head_dim]."""
        b, s, _ = x.shape
        qkv = nn.op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return nn.op.reshape(qkv, (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        out = attention(
            self.project_qkv(x),
            layer_id=self.layer_id,
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            sm_scale=self.sm_scale,
            rope=self.rope,
            sliding_window=self.sliding_window,
            logit_softcap=self.logit_softcap,
            bidirectional=self.bidirectional,
        )  # [b, s, q_heads, head_dim]
        return self.o_proj(nn.op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(nn.op.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention
    mlp_class = LlamaMLP

    def __init__(self, config: LlamaConfig, layer_id: int):
        eps = config.rms_norm_eps
        self.self_attn = self.attention_class(config, layer_id)
        self.mlp = self.mlp_class(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, -1, eps, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    layer_class = LlamaDecoderLayer

    def __init__(self, config: LlamaConfig):
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [self.layer_class(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False)

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    model_class = LlamaModel

    def __init__(self, config: LlamaConfig):
        self.config = config
        self.model = self.model_class(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden_states(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model(input_ids)

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model.embed(input_ids)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.layers)

    def final_norm(self, x: nn.Tensor) -> nn.Tensor:
        return self.model.norm(x)

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.config.tie_word_embeddings:
            weight = self.model.embed_tokens.weight  # [vocab, hidden]
            logits = nn.op.matmul(hidden, nn.op.permute_dims(weight))
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32") if logits.dtype != "float32" else logits

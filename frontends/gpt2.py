"""GPT-2: learned position embeddings, pre-LayerNorm blocks, and Conv1D weights.

transformers' GPT-2 stores every projection as `Conv1D`: weight [in, out], `y = x @ w + b`, the
transpose of `nn.Linear`. Parameter names must equal the checkpoint's, so the layout is handled
in the graph (`Conv1D` below), never by renaming or transposing weights. `c_attn` yields q, k and
v blocks of n_embd each, which is the attention op's fused layout. No RoPE: positions come from
the KV cache (`query_positions`) into `wpe`.
"""

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import activation, from_config
from .entry import CausalLM
from .ops import attention, query_positions


@dataclass
class GPT2Config:
    vocab_size: int
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_positions: int = 1024
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "GPT2Config":
        config = from_config(cls, raw, n_inner=4 * raw.get("n_embd", cls.n_embd))
        activation("activation_function", config.activation_function)
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if getattr(config, key):
                raise RelaxlmError(f"config.json: {key} is not supported")
        if config.n_embd % config.n_head:
            raise RelaxlmError(
                f"config.json: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}"
            )
        return config

    @property
    def context_window(self) -> int:
        return self.n_positions


class Conv1D(nn.Module):
    """transformers' Conv1D: `x @ weight + bias` with weight stored [in_features, out_features]."""

    def __init__(self, in_features: int, out_features: int):
        self.weight = nn.Parameter((in_features, out_features))
        self.bias = nn.Parameter((out_features,))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.matmul(x, self.weight) + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_id: int):
        self.layer_id = layer_id
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.sm_scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = nn.op.reshape(self.c_attn(x), (b, s, 3 * h, d))  # q, k, v heads in order
        out = attention(
            qkv,
            layer_id=self.layer_id,
            num_q_heads=h,
            num_kv_heads=h,
            sm_scale=self.sm_scale,
            rope=None,
        )  # [b, s, h, d]
        return self.c_proj(nn.op.reshape(out, (b, s, h * d)))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        self.c_fc = Conv1D(config.n_embd, config.n_inner)
        self.c_proj = Conv1D(config.n_inner, config.n_embd)
        self.act = activation("activation_function", config.activation_function)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_id: int):
        self.ln_1 = nn.LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_id)
        self.ln_2 = nn.LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, config.layer_norm_epsilon)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        x = self.wte(input_ids) + self.wpe(query_positions(input_ids))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: GPT2Config):
        self.config = config
        self.transformer = GPT2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def hidden_states(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.transformer(input_ids)

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.config.tie_word_embeddings:
            weight = self.transformer.wte.weight  # [vocab, n_embd]
            logits = nn.op.matmul(hidden, nn.op.permute_dims(weight))
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32") if logits.dtype != "float32" else logits

"""BERT encoders (`BertModel`: all-MiniLM, bge, e5, ...) as embedding models.

Module tree and parameter names follow transformers' `BertModel`. Attention is bidirectional
over the real tokens of each text: padding is masked out of the keys with the attention mask,
written as plain graph ops (matmul, softmax) since there is no KV cache to lower onto. Every
token gets token type 0 (one text per row). The pooler head is not part of an embedding.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import from_config
from .entry import Embedder
from .pooling import Pooling, pool

# hidden_act -> nn.op.gelu's `approximate`
_GELU = {"gelu": None, "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BertConfig":
        config = from_config(cls, raw)
        if config.hidden_act not in _GELU:
            raise RelaxlmError(
                f"config.json: hidden_act {config.hidden_act!r} is not supported for BERT "
                f"(supported: {', '.join(_GELU)})"
            )
        if config.position_embedding_type != "absolute":
            raise RelaxlmError(
                f"config.json: position_embedding_type {config.position_embedding_type!r} is not "
                "implemented (supported: absolute)"
            )
        if config.is_decoder:
            raise RelaxlmError("config.json: is_decoder BERT (causal) is not implemented")
        if config.hidden_size % config.num_attention_heads:
            raise RelaxlmError(
                f"config.json: hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, config.layer_norm_eps)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        _, s = input_ids.shape
        positions = self.position_embeddings(nn.op.arange(0, s, dtype="int32"))  # [s, h]
        token_type = self.token_type_embeddings(nn.op.arange(0, 1, dtype="int32"))  # [1, h]
        return self.LayerNorm(self.word_embeddings(input_ids) + positions + token_type)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x: nn.Tensor, mask_bias: nn.Tensor) -> nn.Tensor:
        b, s, h = x.shape
        heads = (b, s, self.num_heads, self.head_dim)
        q = nn.op.permute_dims(nn.op.reshape(self.query(x), heads), [0, 2, 1, 3])  # [b, H, s, d]
        k = nn.op.permute_dims(nn.op.reshape(self.key(x), heads), [0, 2, 3, 1])  # [b, H, d, s]
        v = nn.op.permute_dims(nn.op.reshape(self.value(x), heads), [0, 2, 1, 3])  # [b, H, s, d]
        scores = nn.op.matmul(q, k).astype("float32") * (1.0 / math.sqrt(self.head_dim))
        probs = nn.op.softmax(scores + mask_bias, axis=-1).astype(x.dtype)  # [b, H, s, s]
        out = nn.op.permute_dims(nn.op.matmul(probs, v), [0, 2, 1, 3])  # [b, s, H, d]
        return nn.op.reshape(out, (b, s, h))


class BertSelfOutput(nn.Module):
    """Projection, then LayerNorm over the residual sum (also BERT's FFN output block)."""

    def __init__(self, in_features: int, config: BertConfig):
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x: nn.Tensor, residual: nn.Tensor) -> nn.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, x: nn.Tensor, mask_bias: nn.Tensor) -> nn.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate = _GELU[config.hidden_act]

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.gelu(self.dense(x), approximate=self.approximate)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: nn.Tensor, mask_bias: nn.Tensor) -> nn.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])


class BertModel(Embedder):
    def __init__(self, config: BertConfig, pooling: Pooling):
        self.config = config
        self.pooling = pooling
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def embed(self, input_ids: nn.Tensor, attention_mask: nn.Tensor) -> nn.Tensor:
        b, s = input_ids.shape
        # Keys at padding get the lowest float added to their score, as transformers does.
        padding = 1.0 - attention_mask.astype("float32")
        mask_bias = nn.op.reshape(padding * float(np.finfo(np.float32).min), (b, 1, 1, s))
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        return pool(x, attention_mask, self.pooling)

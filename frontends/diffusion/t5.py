"""T5 encoder (transformers `T5EncoderModel`, v1.1 as FLUX uses it): RMS norms, unscaled
attention with a learned relative-position bias, gated-GELU feed-forwards.

Parameter names equal the checkpoint's (`encoder.block.N.layer.0.SelfAttention.q...`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> T5Config:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        cfg = cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )
        if cfg.feed_forward_proj != "gated-gelu":
            raise RelaxlmError(
                f"T5 feed_forward_proj {cfg.feed_forward_proj!r} is not supported (gated-gelu, "
                "the T5 v1.1 encoder FLUX ships)"
            )
        return cfg


def relative_position_buckets(seq: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[seq, seq] int32 bucket of (key position - query position), bidirectional as T5's
    encoder: half the buckets per direction, exact up to a quarter, log-spaced after."""
    rel = np.arange(seq)[None, :] - np.arange(seq)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    # float32 as transformers computes it, then truncated toward zero
    scaled = np.log(rel.astype(np.float32) / exact, where=rel > 0, out=np.zeros(rel.shape, "f4"))
    far = exact + (scaled / np.float32(math.log(max_distance / exact)) * (half - exact)).astype(
        np.int64
    )
    far = np.minimum(far, half - 1)
    return (buckets + np.where(rel < exact, rel, far)).astype(np.int32)


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nn.Parameter((dim,))
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.rms_norm(x, self.weight, axes=-1, epsilon=self.eps)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        inner = c.num_heads * c.d_kv
        self.heads, self.d_kv = c.num_heads, c.d_kv
        self.q, self.k = (
            nn.Linear(c.d_model, inner, bias=False),
            nn.Linear(c.d_model, inner, bias=False),
        )
        self.v, self.o = (
            nn.Linear(c.d_model, inner, bias=False),
            nn.Linear(inner, c.d_model, bias=False),
        )
        self.relative_attention_bias = (
            nn.Embedding(c.relative_attention_num_buckets, c.num_heads) if has_bias else None
        )

    def forward(self, x: nn.Tensor, bias: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape

        def heads(t):  # [b, s, h*d] -> [b, heads, s, d_kv]
            return nn.op.permute_dims(nn.op.reshape(t, [b, s, self.heads, self.d_kv]), [0, 2, 1, 3])

        # T5 does not scale q.k by 1/sqrt(d); the position bias is added to the scores, which
        # are softmaxed in float32 as transformers does
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = nn.op.matmul(q, nn.op.permute_dims(k, [0, 1, 3, 2])).astype("float32") + bias
        probs = nn.op.softmax(scores, axis=-1).astype(x.dtype)
        out = nn.op.permute_dims(nn.op.matmul(probs, v), [0, 2, 1, 3])  # [b, s, heads, d_kv]
        return self.o(nn.op.reshape(out, [b, s, self.heads * self.d_kv]))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        self.SelfAttention = T5Attention(c, has_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: nn.Tensor, bias: nn.Tensor) -> nn.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, c: T5Config):
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.wo(nn.op.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        self.DenseReluDense = T5DenseGatedActDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_bias), T5LayerFF(c)])

    def forward(self, x: nn.Tensor, bias: nn.Tensor) -> nn.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, c: T5Config):
        # only the first block holds the relative-position table; every block adds its bias
        self.block = nn.ModuleList([T5Block(c, i == 0) for i in range(c.num_layers)])
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    def __init__(self, config: T5Config):
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        """[batch, seq] int32 ids -> [batch, seq, d_model], no attention mask (as FLUX runs it)."""
        c, seq = self.config, int(input_ids.shape[1])
        buckets = relative_position_buckets(
            seq, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(nn.Tensor.from_const(buckets.reshape(-1)))  # [seq * seq, heads]
        bias = nn.op.permute_dims(nn.op.reshape(bias, [seq, seq, c.num_heads]), [2, 0, 1])
        bias = nn.op.reshape(bias, [1, c.num_heads, seq, seq]).astype("float32")
        x = self.shared(input_ids)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

"""Qwen3: Llama with RMSNorm over head_dim on every q and k head, before RoPE.

Its config.json has Llama's keys (read by `LlamaConfig`); unlike Qwen2, `attention_bias` covers
o_proj too, and sliding windows follow `use_sliding_window` / `max_window_layers`.
"""

from tvm.relax.frontend import nn

from .llama import LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__(config, layer_id)
        d, eps = config.head_dim, config.rms_norm_eps
        self.q_norm = nn.RMSNorm(d, -1, eps, bias=False)
        self.k_norm = nn.RMSNorm(d, -1, eps, bias=False)

    def project_qkv(self, x: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        q = self.q_norm(nn.op.reshape(self.q_proj(x), (b, s, hq, d)))
        k = self.k_norm(nn.op.reshape(self.k_proj(x), (b, s, hkv, d)))
        v = nn.op.reshape(self.v_proj(x), (b, s, hkv, d))
        return nn.op.concat([q, k, v], dim=2)  # [b, s, hq + 2 * hkv, d]


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_class = Qwen3Model

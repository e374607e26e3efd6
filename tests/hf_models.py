"""Tiny random-weight Hugging Face checkpoints and the `transformers` oracle that scores them.

The builders live in relaxlm/testing/tiny_models.py (shared with the scripts); tests use this
module only:

    from hf_models import PARITY_CASES, hf_greedy, hf_logits, make_model
    model_dir = make_model(tmp_path, **PARITY_CASES["llama_gqa"])

Embedding models: `make_embedding_model` writes a sentence-transformers folder, `hf_embeddings`
scores it.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import numpy as np
import torch
import transformers

from relaxlm.testing.tiny_models import (
    ARCHITECTURES,
    CHATML_TEMPLATE,
    EMBEDDING_ARCHITECTURES,
    SPECIAL_TOKENS,
    TINY_CONFIG,
    make_embedding_model,
    make_model,
    make_tokenizer,
    tokenizer_size,
)

__all__ = [
    "ARCHITECTURES",
    "CHATML_TEMPLATE",
    "EMBEDDING_ARCHITECTURES",
    "PARITY_CASES",
    "SPECIAL_TOKENS",
    "TINY_CONFIG",
    "hf_embeddings",
    "hf_greedy",
    "hf_logits",
    "load_hf_model",
    "make_embedding_model",
    "make_model",
    "make_tokenizer",
    "tokenizer_size",
]

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# make_model keyword arguments, one entry per configuration the parity tests cover.
PARITY_CASES: dict[str, dict] = {
    "llama_gqa": {"arch": "LlamaForCausalLM"},
    "llama_mqa": {"arch": "LlamaForCausalLM", "seed": 1, "num_key_value_heads": 1},
    # head_dim 32 != hidden 64 / 4 heads: q_proj is [128, 64], o_proj is [64, 128].
    "llama_head_dim": {"arch": "LlamaForCausalLM", "seed": 2, "head_dim": 32},
    # Llama-3.2 shape: byte-level BPE, tied embeddings, llama3 rope, transformers-4 config keys.
    "llama_tied_llama3_rope": {
        "arch": "LlamaForCausalLM",
        "seed": 3,
        "tokenizer": "bpe",
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
        "legacy_config": True,
    },
    "llama_linear_rope": {
        "arch": "LlamaForCausalLM",
        "seed": 4,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    # Sharded like real Mistral checkpoints (model.safetensors.index.json + 5 shards).
    "mistral": {"arch": "MistralForCausalLM", "seed": 5, "max_shard_size": "100KB"},
    "qwen2": {
        "arch": "Qwen2ForCausalLM",
        "seed": 6,
        "tokenizer": "bpe",
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        # The MCP tests serve it with tools, listed in the prompt (its template drops them).
        "max_position_embeddings": 1024,
    },
    # Mixture of experts: 8 experts, top-2, renormalised (Mixtral always renormalises).
    "mixtral": {
        "arch": "MixtralForCausalLM",
        "seed": 20,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    # Qwen3-30B-A3B's routing (norm_topk_prob) and q/k norms; expert width 48 != dense 128.
    "qwen3_moe": {
        "arch": "Qwen3MoeForCausalLM",
        "seed": 21,
        "tokenizer": "bpe",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "norm_topk_prob": True,
    },
    # Top-3 probabilities used as they are (no renormalising); layer 0 a dense MLP.
    "qwen3_moe_dense_layer": {
        "arch": "Qwen3MoeForCausalLM",
        "seed": 22,
        "tokenizer": "bpe",
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "norm_topk_prob": False,
        "mlp_only_layers": [0],
    },
    # q/k RMSNorm; attention_bias puts a bias on o_proj too (unlike Qwen2).
    "qwen3": {"arch": "Qwen3ForCausalLM", "seed": 30, "tokenizer": "bpe", "attention_bias": True},
    # Cases with "sliding_window" run 40 tokens in test_parity, far past the 8-token window.
    # Layer 1 slides, layer 0 does not: per-layer windows, prefill chunks of <= 8 tokens.
    "qwen3_sliding": {
        "arch": "Qwen3ForCausalLM",
        "seed": 31,
        "use_sliding_window": True,
        "sliding_window": 8,
        "max_window_layers": 1,
    },
    # One window on every layer.
    "mistral_sliding": {"arch": "MistralForCausalLM", "seed": 32, "sliding_window": 8},
    # Fused qkv/gate_up, half the head rotated, LongRoPE (long factors from position 32 on:
    # scoring crosses it, greedy decoding stops before it; see compiler/rope.py), a window.
    "phi3": {
        "arch": "Phi3ForCausalLM",
        "seed": 33,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 32,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6],
            "long_factor": [1.2, 2.0, 4.0, 8.0],
        },
        "sliding_window": 8,
    },
    # Phi-2: parallel attention + MLP, LayerNorm with biases, partial rotary, q/k LayerNorm.
    "phi": {"arch": "PhiForCausalLM", "seed": 13, "qk_layernorm": True},
    # Untied lm_heads for Gemma: with random weights a tied one echoes the input token (the scaled
    # embedding dominates the residual). Small soft-caps so that capping changes the numbers.
    "gemma2": {
        "arch": "Gemma2ForCausalLM",
        "seed": 35,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "attn_logit_softcapping": 3.0,
        "final_logit_softcapping": 12.0,
        "tie_word_embeddings": False,
    },
    # Local (sliding) and global (full, linearly scaled) RoPE bases, q/k norms.
    "gemma3": {
        "arch": "Gemma3ForCausalLM",
        # 37: with the deterministic SPM tokenizer, seed 36's greedy decode repeated 2 tokens
        "seed": 37,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
        "tie_word_embeddings": False,
    },
    # Learned positions, LayerNorm, Conv1D weights stored [in, out], tied lm_head.
    "gpt2": {"arch": "GPT2LMHeadModel", "seed": 37, "tokenizer": "bpe"},
}


@functools.lru_cache(maxsize=8)
def _load(model_dir: str, config_mtime_ns: int) -> transformers.PreTrainedModel:
    del config_mtime_ns  # part of the cache key only: a rewritten checkpoint is reloaded
    # Eager attention: the plainest float32 reference.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def load_hf_model(model_dir: str | Path) -> transformers.PreTrainedModel:
    """The float32 `transformers` model in `model_dir` (cached until config.json changes)."""
    path = Path(model_dir).resolve()
    return _load(str(path), (path / "config.json").stat().st_mtime_ns)


def hf_logits(model_dir: str | Path, token_ids, prefill: int, linear_input=None) -> np.ndarray:
    """Float32 logits following relaxlm's `score` contract, computed with `transformers`.

    Row 0 holds the next-token logits after prefilling `token_ids[:prefill]`; row j >= 1 those
    after decoding `token_ids[prefill + j - 1]` one step at a time with the KV cache.
    linear_input(module_name, x) -> x, when given, rewrites the input of every nn.Linear.
    Returns [len(token_ids) - prefill + 1, vocab_size] float32.
    """
    ids = [int(t) for t in token_ids]
    if not 1 <= prefill <= len(ids):
        raise ValueError(f"prefill={prefill} must be in [1, len(token_ids)={len(ids)}]")
    model = load_hf_model(model_dir)
    if linear_input is not None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(
                    lambda _m, args, name=name: (linear_input(name, args[0]), *args[1:])
                )
    cache = transformers.DynamicCache(config=model.config)  # filled in place by each call
    # transformers 5 renamed forward's `past_key_values` to `cache`; pyproject allows 4.56+.
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    rows = []
    with torch.no_grad():
        steps = [ids[:prefill]] + [[t] for t in ids[prefill:]]
        for step in steps:
            out = model(torch.tensor([step]), use_cache=True, **{cache_kw: cache})
            rows.append(out.logits[0, -1])
    return torch.stack(rows).float().numpy()


def hf_greedy(model_dir: str | Path, prompt_ids, n: int) -> list[int]:
    """The `n` tokens `generate` picks greedily after `prompt_ids`; eos neither stops nor is masked.

    eos_token_id=None makes every step a pure argmax and never stops early, so exactly `n`
    tokens come back. (min_new_tokens=n would instead mask eos out of the logits, which
    changes the pick whenever eos is the argmax.)
    """
    model = load_hf_model(model_dir)
    prompt = torch.tensor([[int(t) for t in prompt_ids]])
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
    new = out[0, prompt.shape[1] :].tolist()
    assert len(new) == n, (len(new), n)
    return new


def hf_embeddings(model_dir: str | Path, texts: list[str]) -> np.ndarray:
    """Sentence embeddings of a sentence-transformers folder, computed one text at a time with
    `transformers` (no padding) and pooled here as sentence-transformers documents its modes.

    Reads modules.json (Pooling modes, Normalize) and sentence_bert_config.json (max_seq_length,
    else the model's max_position_embeddings).
    Returns [len(texts), dim] float32.
    """
    path = Path(model_dir)
    modules = json.loads((path / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = json.loads(
        (path / modules[kinds.index("Pooling")]["path"] / "config.json").read_text()
    )
    modes = pooling["pooling_mode"]
    modes = [modes] if isinstance(modes, str) else modes
    max_len = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
    # tokenizer.json as written: AutoTokenizer would rebuild a Qwen2 tokenizer's pre-tokenizer
    # from the model type, which the tiny checkpoints' tokenizers do not follow.
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    model = transformers.AutoModel.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # sentence-transformers' default: as long as the model's position table.
    max_len = max_len or model.config.max_position_embeddings
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
            hidden = model(torch.tensor([ids])).last_hidden_state[0]  # [tokens, dim]
            pooled = {
                "mean": hidden.mean(0),
                "mean_sqrt_len_tokens": hidden.sum(0) / len(ids) ** 0.5,
                "max": hidden.max(0).values,
                "cls": hidden[0],
                "lasttoken": hidden[-1],
            }
            vector = torch.cat([pooled[m] for m in modes])
            if "Normalize" in kinds:
                vector = torch.nn.functional.normalize(vector, dim=0)
            rows.append(vector)
    return torch.stack(rows).float().numpy()

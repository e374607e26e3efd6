"""Tiny random-weight Hugging Face checkpoints and the `transformers` oracle that scores them.

The builders live in scripts/make_tiny_model.py (scripts must not import from tests/), which
is imported here by path; tests use this module only:

    from hf_models import PARITY_CASES, hf_greedy, hf_logits, make_model
    model_dir = make_model(tmp_path, **PARITY_CASES["llama_gqa"])
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_tiny_model import (  # noqa: E402  (importable only once scripts/ is on sys.path)
    ARCHITECTURES,
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    TINY_CONFIG,
    make_model,
    make_tokenizer,
    tokenizer_size,
)

__all__ = [
    "ARCHITECTURES",
    "CHATML_TEMPLATE",
    "PARITY_CASES",
    "SPECIAL_TOKENS",
    "TINY_CONFIG",
    "hf_greedy",
    "hf_logits",
    "load_hf_model",
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
    },
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


def hf_logits(model_dir: str | Path, token_ids, prefill: int) -> np.ndarray:
    """Float32 logits following relaxlm's `score` contract, computed with `transformers`.

    Row 0 holds the next-token logits after prefilling `token_ids[:prefill]`; row j >= 1 those
    after decoding `token_ids[prefill + j - 1]` one step at a time with the KV cache.
    Returns [len(token_ids) - prefill + 1, vocab_size] float32.
    """
    ids = [int(t) for t in token_ids]
    if not 1 <= prefill <= len(ids):
        raise ValueError(f"prefill={prefill} must be in [1, len(token_ids)={len(ids)}]")
    model = load_hf_model(model_dir)
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

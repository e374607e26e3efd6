"""relaxlm against `transformers` in the artifact's own dtype: the oracle side of the dtype
parity tests (tests/test_dtype_parity.py) and of `scripts/gpu_check.py`.

The reference runs the checkpoint in `transformers` (eager attention, torch on the CPU) in the
dtype relaxlm computes in, so a float16 artifact is compared with float16 transformers, not
with float32 rounded. Two implementations round differently, so the tolerance is set by the
dtype: the largest logit difference over the range of the reference logits (`logit_error`), at
most `TOLERANCE[dtype]` — about 40 unit roundoffs of float16 (2^-11: 0.0195) and 30 of
bfloat16 (2^-8: 0.117). Measured on the tiny models: float16 0.002-0.012, bfloat16 0.006-0.07.
relaxlm's 16-bit graphs are the less exact side: on Mistral (float16) and Phi-3 (bfloat16) they
are ~3x further from float32 than transformers in the same dtype (torch accumulates 16-bit
matmuls in float32; relaxlm's kernels accumulate in the 16-bit dtype).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
import transformers

# max |ours - reference| / (max - min of reference), per dtype
TOLERANCE = {"float32": 5e-4, "float16": 2e-2, "bfloat16": 1.2e-1}

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_reference(model_dir: str | Path, dtype: str = "float32") -> transformers.PreTrainedModel:
    """The checkpoint as a `transformers` model in `dtype`, eager attention, eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=_TORCH_DTYPES[dtype], attn_implementation="eager"
    )
    return model.eval()


def reference_logits(model, token_ids: list[int], prefill: int) -> np.ndarray:
    """relaxlm's `score` contract computed by a `transformers` model: row 0 the next-token
    logits after prefilling `token_ids[:prefill]`, row j the logits after decoding token
    `prefill + j - 1` with the KV cache. Returns [len - prefill + 1, vocab] float32."""
    ids = [int(t) for t in token_ids]
    cache = transformers.DynamicCache(config=model.config)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 / 4
    rows = []
    with torch.no_grad():
        for step in [ids[:prefill]] + [[t] for t in ids[prefill:]]:
            out = model(torch.tensor([step]), use_cache=True, **{cache_kw: cache})
            rows.append(out.logits[0, -1].float())
    return torch.stack(rows).numpy()


def reference_greedy(model, prompt_ids: list[int], n: int, **inputs) -> list[int]:
    """The `n` tokens a `transformers` model picks greedily (eos neither stops nor is masked);
    `inputs`: more of the model's inputs (pixel_values, ...)."""
    prompt = torch.tensor([[int(t) for t in prompt_ids]])
    with torch.no_grad():
        out = model.generate(
            prompt,
            **inputs,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, prompt.shape[1] :].tolist()


def logit_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / (max - min of reference) (shapes must match)."""
    if ours.shape != reference.shape:
        raise ValueError(f"logits of shape {ours.shape} vs reference {reference.shape}")
    return float(np.abs(ours - reference).max() / np.ptp(reference))


def token_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """`<s>` then n - 1 random ordinary tokens (ids 5.. vocab - 1)."""
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(5, vocab, n - 1).tolist()

"""Every architecture against transformers: logits through prefill and decode, greedy tokens."""

import numpy as np
import pytest
from hf_models import PARITY_CASES, hf_greedy, hf_logits

import relaxlm

PREFILL, DECODE = 12, 12
SLIDING_DECODE = 28  # cases with a sliding window run 40 tokens, far past their window


def _decode_steps(case: str) -> int:
    return SLIDING_DECODE if PARITY_CASES[case].get("sliding_window") else DECODE


def _token_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(5, vocab, n - 1).tolist()  # <s>, then ordinary tokens


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_equal_transformers(case, checkpoints, compiled):
    llm = compiled(case)
    decode = _decode_steps(case)
    ids = _token_ids(llm.model.vocab_size, PREFILL + decode)
    ours = llm.score(ids, prefill=PREFILL)
    ref = hf_logits(checkpoints(case), ids, PREFILL)
    assert ours.shape == ref.shape == (decode + 1, llm.model.vocab_size)
    if PARITY_CASES[case].get("sliding_window"):  # the window is compiled in and passed
        assert 0 < max(llm.manifest.kv_cache["sliding_windows"]) < len(ids)
    err = np.abs(ours - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), (
        f"max abs error {err} vs max |logit| {np.abs(ref).max()}"
    )


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_greedy_equals_transformers(case, checkpoints, compiled):
    llm = compiled(case)
    prompt = _token_ids(llm.model.vocab_size, 8, seed=1)
    params = relaxlm.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    (result,) = llm.generate([prompt], params)
    assert result.token_ids == hf_greedy(checkpoints(case), prompt, 16)
    assert result.finish_reason == "length"

"""Every architecture against transformers: logits through prefill and decode, greedy tokens."""

import numpy as np
import pytest
from hf_models import PARITY_CASES, hf_greedy, hf_logits

import relaxlm

PREFILL, DECODE = 12, 12


def _token_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(5, vocab, n - 1).tolist()  # <s>, then ordinary tokens


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_equal_transformers(case, checkpoints, compiled):
    llm = compiled(case)
    ids = _token_ids(llm.model.vocab_size, PREFILL + DECODE)
    ours = llm.score(ids, prefill=PREFILL)
    ref = hf_logits(checkpoints(case), ids, PREFILL)
    assert ours.shape == ref.shape == (DECODE + 1, llm.model.vocab_size)
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

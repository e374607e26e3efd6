"""float16 and bfloat16 CPU artifacts of every architecture against `transformers` run in the
same dtype (issue 17): logits after prefill and after each of 6 decode steps, within the dtype's
tolerance (relaxlm/testing/parity.py: max |difference| over the range of the reference logits,
2e-2 for float16 and 0.12 for bfloat16, with how they were set). So the 16-bit graphs the GPU
builds share are run, and checked, on every test run.
"""

import pytest
from hf_models import PARITY_CASES

from relaxlm.testing.parity import (
    TOLERANCE,
    load_reference,
    logit_error,
    reference_logits,
    token_ids,
)

# One case per architecture (their float32 parity is in test_parity.py).
CASES = [
    "llama_tied_llama3_rope",
    "mistral",
    "qwen2",
    "mixtral",
    "qwen3_moe",
    "qwen3",
    "phi3",
    "phi",
    "gemma2",
    "gemma3",
    "gpt2",
]
PREFILL, DECODE = 10, 6


def test_one_case_per_architecture():
    from hf_models import ARCHITECTURES

    assert sorted(PARITY_CASES[c]["arch"] for c in CASES) == sorted(ARCHITECTURES)


PAIRS = [(case, dtype) for case in CASES for dtype in ("float16", "bfloat16")]


@pytest.mark.parametrize(("case", "dtype"), PAIRS)
def test_logits_equal_transformers_in_the_same_dtype(case, dtype, checkpoints, compiled):
    llm = compiled(case, dtype)
    assert llm.manifest.dtype == dtype
    ids = token_ids(llm.vocab_size, PREFILL + DECODE)
    ours = llm.score(ids, prefill=PREFILL)
    reference = reference_logits(load_reference(checkpoints(case), dtype), ids, PREFILL)
    assert ours.shape == reference.shape == (DECODE + 1, llm.vocab_size)
    error = logit_error(ours, reference)
    assert error <= TOLERANCE[dtype], (
        f"{case} in {dtype}: max |logit difference| is {error:.4f} of the logit range, "
        f"tolerance {TOLERANCE[dtype]}"
    )

"""Sampler and SamplingParams, on plain numpy logits."""

import math

import numpy as np
import pytest

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.sampler import Sampler, SamplingParams


def random_logits(seed: int, vocab: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, vocab).astype(np.float32)


def draw(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.sample(logits) for _ in range(n)])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001; draws use fixed seeds, so the tests are deterministic.
CHI2_CRITICAL_P001 = {3: 16.27, 7: 24.32}


def test_greedy_is_argmax():
    for seed in range(20):
        logits = random_logits(seed)
        assert Sampler(SamplingParams(temperature=0)).sample(logits) == int(np.argmax(logits))


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}])
def test_filters_that_leave_one_token_are_greedy(filters):
    for seed in range(20):
        logits = random_logits(seed)
        params = SamplingParams(temperature=1.5, seed=seed, **filters)
        assert set(draw(params, logits, 20)) == {int(np.argmax(logits))}


def test_same_seed_same_tokens_and_different_seeds_differ():
    logits = random_logits(0, vocab=50) / 4
    a = draw(SamplingParams(seed=7, top_k=20, top_p=0.9), logits, 200)
    b = draw(SamplingParams(seed=7, top_k=20, top_p=0.9), logits, 200)
    c = draw(SamplingParams(seed=8, top_k=20, top_p=0.9), logits, 200)
    assert (a == b).all()
    assert (a != c).any()


def test_no_seed_draws_fresh_entropy():
    logits = np.zeros(1000, np.float32)
    assert (draw(SamplingParams(), logits, 20) != draw(SamplingParams(), logits, 20)).any()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distribution_is_softmax_of_logits_over_temperature(temperature):
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0], np.float32)
    tokens = draw(SamplingParams(temperature=temperature, seed=123), logits, 20000)
    counts = np.bincount(tokens, minlength=len(logits))
    probs = softmax(logits.astype(np.float64) / temperature)
    assert chi_square(counts, probs) < CHI2_CRITICAL_P001[7]


def test_top_k_samples_the_renormalized_top_k():
    logits = np.array([0.1, 3.0, -1.0, 2.0, 2.5, 0.0, 1.0, -3.0], np.float32)
    tokens = draw(SamplingParams(top_k=4, seed=5), logits, 20000)
    top4 = np.argsort(-logits)[:4]
    assert set(tokens) == set(top4.tolist())
    counts = np.bincount(tokens, minlength=len(logits))[top4]
    assert chi_square(counts, softmax(logits[top4].astype(np.float64))) < CHI2_CRITICAL_P001[3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs).astype(np.float32)
    tokens = draw(SamplingParams(top_p=0.75, seed=9), logits, 20000)
    assert set(tokens) == {1, 3}  # 0.5 alone is below 0.75; 0.5 + 0.3 reaches it
    assert abs(np.mean(tokens == 1) - 0.5 / 0.8) < 0.015
    assert set(draw(SamplingParams(top_p=0.81, seed=9), logits, 2000)) == {1, 2, 3}


def test_sample_returns_python_int_and_rejects_bad_logits():
    token = Sampler(SamplingParams(seed=0)).sample(random_logits(0))
    assert type(token) is int
    with pytest.raises(ValueError, match="one row"):
        Sampler(SamplingParams()).sample(np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        Sampler(SamplingParams()).sample(np.array([0.0, math.nan], np.float32))


def test_stop_token_ids_become_a_tuple():
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("seed", -1),
        ("seed", 1.5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["eos"]),
        ("stop_token_ids", 2),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(RelaxlmError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})

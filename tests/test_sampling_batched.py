"""Batched sampling, penalties, logit bias, min_p, logprobs and stop strings on plain numpy."""

import math

import numpy as np
import pytest

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.detokenizer import StopStrings
from relaxlm.runtime.sampler import Sampler, SamplingParams, _adjusted, sample_batch


def logits(seed: int, vocab: int = 200, batch: int | None = None) -> np.ndarray:
    shape = (vocab,) if batch is None else (batch, vocab)
    return np.random.default_rng(seed).normal(0, 3, shape).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_a_seeded_row_draws_the_same_tokens_whatever_the_batch():
    params = SamplingParams(seed=11, temperature=0.9, top_k=40, top_p=0.95, min_p=0.01)
    rows = [logits(step) for step in range(30)]
    alone = Sampler(params, [1, 2])
    want = [sample_batch(row[None], [alone])[0].token_id for row in rows]
    others = [Sampler(SamplingParams(temperature=1.5)) for _ in range(5)]
    batched = Sampler(params, [1, 2])
    got = []
    for step, row in enumerate(rows):
        batch = logits(1000 + step, batch=6)
        batch[step % 6] = row  # a different slot each step
        samplers = others[: step % 6] + [batched] + others[step % 6 :]
        got.append(sample_batch(batch, samplers)[step % 6].token_id)
    assert got == want


def test_completion_streams_are_seed_then_seed_and_index():
    row = logits(0) / 6
    draws = {}
    for stream in range(3):
        sampler = Sampler(SamplingParams(seed=5), stream=stream)
        draws[stream] = [sampler.sample(row) for _ in range(50)]
    first = Sampler(SamplingParams(seed=5))
    assert draws[0] == [first.sample(row) for _ in range(50)]
    assert draws[0] != draws[1] != draws[2]


def test_logit_bias_and_penalties_change_greedy_choices():
    row = np.array([5.0, 4.0, -1.0, 0.5], np.float32)
    greedy = SamplingParams(temperature=0)
    assert Sampler(greedy).sample(row) == 0
    assert Sampler(SamplingParams(temperature=0, logit_bias={2: 10.0})).sample(row) == 2
    # repetition: 5 / 2 = 2.5 < 4; a negative seen logit is multiplied (pushed further down)
    rep = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[0, 2])
    assert rep.sample(row) == 1
    # presence / frequency look at generated tokens only, not the prompt
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=0.6), prompt_ids=[0])
    assert [freq.sample(row) for _ in range(4)] == [0, 0, 1, 0]  # 5, 4.4 vs 4, 3.8 vs 4 ...
    pres = Sampler(SamplingParams(temperature=0, presence_penalty=1.5))
    assert [pres.sample(row) for _ in range(3)] == [0, 1, 0]  # 3.5 < 4, then 2.5 vs 3.5


def test_penalties_match_their_formulas():
    row = logits(3, vocab=20)
    params = SamplingParams(
        temperature=0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25
    )
    sampler = Sampler(params, prompt_ids=[1, 2, 3])
    for token in (3, 4, 4, 5):
        sampler.record(token)
    want = row.astype(np.float64)
    for t in (1, 2, 3, 4, 5):
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t, count in {3: 1, 4: 2, 5: 1}.items():
        want[t] -= 0.25 * count + 0.4
    np.testing.assert_allclose(_adjusted(row, sampler), want, rtol=1e-12)


def test_min_p_keeps_tokens_within_a_factor_of_the_best():
    probs = np.array([0.5, 0.3, 0.12, 0.05, 0.03])
    row = np.log(probs).astype(np.float32)
    sampler = Sampler(SamplingParams(min_p=0.2, seed=0))  # keeps p >= 0.1
    assert set(sampler.sample(row) for _ in range(3000)) == {0, 1, 2}


def test_logprobs_are_the_raw_log_softmax_with_sorted_top_tokens():
    batch = logits(4, batch=3)
    samplers = [
        Sampler(SamplingParams(temperature=0, logprobs=5)),
        Sampler(SamplingParams(seed=1, temperature=0.7, logprobs=0)),
        Sampler(SamplingParams(temperature=0)),
    ]
    a, b, c = sample_batch(batch, samplers)
    ref = log_softmax(batch[0])
    assert a.logprob.token_id == a.token_id == int(np.argmax(batch[0]))
    assert a.logprob.logprob == pytest.approx(ref[a.token_id], abs=1e-9)
    assert [t for t, _ in a.logprob.top] == np.argsort(-ref)[:5].tolist()
    assert [lp for _, lp in a.logprob.top] == pytest.approx(np.sort(ref)[::-1][:5], abs=1e-9)
    assert b.logprob.top == () and b.logprob.logprob == pytest.approx(
        log_softmax(batch[1])[b.token_id], abs=1e-9
    )
    assert c.logprob is None


def test_sample_batch_checks_its_inputs():
    with pytest.raises(ValueError, match="one sampler per row"):
        sample_batch(logits(0, batch=2), [Sampler(SamplingParams())])
    with pytest.raises(ValueError, match="NaN"):
        sample_batch(np.array([[0.0, math.nan]]), [Sampler(SamplingParams())])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("logit_bias", {"a": 1}),
        ("logit_bias", {1: math.inf}),
        ("logprobs", -1),
        ("stop", [""]),
        ("stop", 3),
    ],
)
def test_invalid_new_params_name_the_field(field, value):
    with pytest.raises(RelaxlmError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_stop_is_a_tuple_of_strings():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


# -- stop strings -------------------------------------------------------------------------------


def run_stops(stops, deltas):
    matcher = StopStrings(tuple(stops))
    out = []
    for delta in deltas:
        text, hit = matcher.push(delta)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_string_split_across_deltas_is_found_and_not_emitted():
    assert run_stops(["END"], ["The story E", "N", "D and more"]) == ("The story ", True)
    assert run_stops(["END"], ["E", "N", "d", "!"]) == ("ENd!", False)


def test_text_that_may_start_a_stop_string_is_held_back_until_decided():
    matcher = StopStrings(("<|end|>",))
    assert matcher.push("hello <|") == ("hello ", False)
    assert matcher.push("en") == ("", False)
    assert matcher.push("x") == ("<|enx", False)
    assert matcher.push(" <|e") == (" ", False)
    assert matcher.flush() == "<|e"


def test_the_earliest_stop_string_wins():
    assert run_stops(["bc", "abcd"], ["xxab", "cd"]) == ("xx", True)
    assert run_stops(["world", "lo"], ["hello world"]) == ("hel", True)
    assert run_stops([], ["a", "b"]) == ("ab", False)

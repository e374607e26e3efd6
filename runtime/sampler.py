"""Choosing next tokens from logits: penalties, logit bias, greedy or temperature / min-p /
top-k / top-p sampling, and log-probabilities.

Data in, data out: `sample_batch` takes a [batch, vocab] array of logits and one `Sampler` per
row (the per-sequence state: its random generator and the tokens it has seen) and returns the
chosen tokens, so it is tested on CPU without a model. Each row draws from its own generator,
so a seeded request gets the same tokens alone or batched with others.

Order of operations on a row: logit_bias, repetition penalty (prompt and output tokens),
presence and frequency penalties (output tokens), the sequence's token constraint (a grammar's
mask for structured output: disallowed tokens get -inf); then greedy takes the argmax, or sampling
divides by the temperature and keeps the tokens that pass min_p (relative to the most likely
token), top_k and top_p, in that order (ties at a cut settled by token id), and draws by
inverse CDF over the kept tokens in id order (`inverse_cdf`, which the GPU kernels share).
Log-probabilities are those of the raw logits (the model's own distribution), as vLLM reports
by default.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from relaxlm.errors import RelaxlmError


@dataclass
class SamplingParams:
    """How to generate. temperature=0 is greedy; each filter's default switches it off.

    n: completions per prompt; they share the prompt's KV pages.
    stop: strings that end a completion; they are matched across token boundaries and are not
        part of the returned text.
    stop_token_ids: tokens that end a completion (as EOS does unless ignore_eos).
    logprobs: None for none, k >= 0 for the sampled token's log-probability plus the k most
        likely tokens at each step.
    logit_bias: {token id: value added to its logit}.
    seed: the first completion draws from `numpy.random.default_rng(seed)`, completion i > 0
        from `default_rng([seed, i])`; None draws fresh entropy.
    constraint: a factory of TokenConstraint, called once per completion (each has its own
        state); its mask limits the tokens that completion may take (structured output).
    speculative: let the engine speculate for this request when it has a drafter (the same
        distribution either way; requests with logprobs or a constraint never speculate).
    lora: the name of a LoRA adapter loaded into the model's slots (runtime/lora.py) to
        generate with; None: the base model.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    n: int = 1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    constraint: "Callable[[], TokenConstraint] | None" = None
    speculative: bool = True
    lora: str | None = None

    def __post_init__(self):
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            _invalid("lora", self.lora, "None or the name of a loaded LoRA adapter")
        if not isinstance(self.stop_token_ids, list | tuple | set | frozenset):
            _invalid("stop_token_ids", self.stop_token_ids, "a list of token ids")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, list | tuple) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            _invalid("stop", self.stop, "a string or a list of non-empty strings")
        self.stop = tuple(self.stop)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _invalid("max_tokens", self.max_tokens, "an integer >= 1")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            _invalid("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            _invalid("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            _invalid("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            _invalid("min_p", self.min_p, "a number in [0, 1] (0 = off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            _invalid("seed", self.seed, "None or an integer >= 0")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            _invalid("stop_token_ids", self.stop_token_ids, "token ids (integers >= 0)")
        if not _is_int(self.n) or self.n < 1:
            _invalid("n", self.n, "an integer >= 1")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            _invalid("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2 <= value <= 2:
                _invalid(name, value, "a number in [-2, 2] (0 = off)")
        if not isinstance(self.logit_bias, dict) or not all(
            _is_int(t) and t >= 0 and _is_real(b) and math.isfinite(b)
            for t, b in self.logit_bias.items()
        ):
            _invalid("logit_bias", self.logit_bias, "a dict {token id: finite number}")
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            _invalid("logprobs", self.logprobs, "None or an integer >= 0 (top tokens to return)")
        if not isinstance(self.speculative, bool):
            _invalid("speculative", self.speculative, "True or False")
        if self.constraint is not None and not callable(self.constraint):
            _invalid("constraint", self.constraint, "None or a factory of TokenConstraint")

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _invalid(field: str, value, expected: str):
    raise RelaxlmError(f"SamplingParams.{field}={value!r} is invalid; set it to {expected}")


class TokenConstraint(Protocol):
    """One sequence's limit on its next token, e.g. a grammar's state (structured output).

    Data in, data out like the sampler: the sampler asks for a mask before each choice and
    reports the token it chose.
    """

    def allowed(self, vocab_size: int) -> np.ndarray | None:
        """bool [vocab_size]: the tokens the next step may take; None allows every token."""
        ...

    def accept(self, token: int) -> None:
        """The token the sequence took."""
        ...


@dataclass(frozen=True)
class Logprob:
    """The log-probability of a chosen token, and the most likely tokens at that step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: Logprob | None  # None unless SamplingParams.logprobs is set


class Sampler:
    """The sampling state of one sequence: its random generator and the tokens it has seen.

    prompt_ids: the prompt, for repetition_penalty.
    stream: which completion of the request (0 uses `seed` itself, see SamplingParams.seed).
    """

    def __init__(self, params: SamplingParams, prompt_ids=(), stream: int = 0):
        self.params = params
        seed = params.seed if params.seed is None or stream == 0 else [params.seed, stream]
        self.rng = np.random.default_rng(seed)
        self.prompt_ids = np.unique(np.asarray(prompt_ids, dtype=np.int64))
        self.output_counts: dict[int, int] = {}  # token -> times generated
        self.constraint = None if params.constraint is None else params.constraint()

    def sample(self, logits: np.ndarray) -> int:
        """One token id from a [vocab] row of logits."""
        logits = np.asarray(logits)
        if logits.ndim != 1:
            raise ValueError(f"sample takes one row of logits, shape [vocab]; got {logits.shape}")
        return sample_batch(logits[None], [self])[0].token_id

    def record(self, token: int) -> None:
        self.output_counts[token] = self.output_counts.get(token, 0) + 1
        if self.constraint is not None:
            self.constraint.accept(token)


def sample_batch(logits: np.ndarray, samplers: list[Sampler]) -> list[Sample]:
    """One token per row of `logits` [batch, vocab], row i chosen with `samplers[i]`, which
    records it (for the penalties)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(
            f"sample_batch takes [batch, vocab] logits and one sampler per row; got "
            f"{logits.shape} and {len(samplers)} samplers"
        )
    if np.isnan(logits).any():
        raise ValueError("logits contain NaN; the model's output is broken")
    samples = []
    for row, sampler in zip(logits, samplers, strict=True):
        token = _choose(_constrained(_adjusted(row, sampler), sampler), sampler)
        logprob = None if sampler.params.logprobs is None else _logprob(row, token, sampler)
        sampler.record(token)
        samples.append(Sample(token, logprob))
    return samples


def _adjusted(row: np.ndarray, sampler: Sampler) -> np.ndarray:
    """The row after logit_bias and penalties, float64."""
    p = sampler.params
    scores = row.astype(np.float64)
    vocab = scores.shape[0]
    if p.logit_bias:
        ids = np.fromiter(p.logit_bias, dtype=np.int64)
        keep = ids < vocab
        scores[ids[keep]] += np.fromiter(p.logit_bias.values(), dtype=np.float64)[keep]
    if not p.penalized:
        return scores
    out_ids = np.fromiter(sampler.output_counts, dtype=np.int64, count=len(sampler.output_counts))
    counts = np.fromiter(sampler.output_counts.values(), dtype=np.float64, count=len(out_ids))
    if p.repetition_penalty != 1:
        # As in transformers and vLLM: divide positive logits, multiply negative ones.
        seen = np.union1d(sampler.prompt_ids, out_ids)
        seen = seen[seen < vocab]
        s = scores[seen]
        scores[seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
    if len(out_ids):
        scores[out_ids] -= p.frequency_penalty * counts + p.presence_penalty
    return scores


def _constrained(scores: np.ndarray, sampler: Sampler) -> np.ndarray:
    """The scores with the constraint's disallowed tokens at -inf (they are never chosen)."""
    if sampler.constraint is None:
        return scores
    allowed = sampler.constraint.allowed(scores.shape[0])
    # None, or a grammar at a dead end (allows nothing): unconstrained, since raising here
    # would fail every request in the batch.
    if allowed is None or not allowed.any():
        return scores
    return np.where(allowed, scores, -np.inf)


def _choose(scores: np.ndarray, sampler: Sampler) -> int:
    p = sampler.params
    if p.temperature == 0:
        return int(np.argmax(scores))  # the lowest id among equal maxima
    ids, probs = _kept(scores, p)
    return int(ids[inverse_cdf(probs, sampler.rng.random())])


def inverse_cdf(probs: np.ndarray, uniform: float) -> int:
    """The draw, defined once (the GPU kernel in compiler/sampling_kernels.py makes the same):
    the first index whose cumulative probability exceeds `uniform` (in [0, 1)) times the total,
    over unnormalized probabilities; the last index where rounding leaves none."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), len(cdf) - 1)


def _kept(scores: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may take after temperature, min_p, top_k and top_p, in token-id
    order, and their probabilities (after top_p, not renormalized).

    Each filter keeps a prefix of the *rank order* (score descending, then token id
    ascending), so ties at a cut are settled by id: the same rule the GPU kernel follows."""
    scores = scores / p.temperature
    best = scores.max()
    pool = None  # the min_p survivors (None: every token)
    keep = scores.shape[0]
    if p.min_p > 0:
        # probability >= min_p * max probability  <=>  score >= max score + log(min_p)
        pool = np.flatnonzero(scores >= best + math.log(p.min_p))
        keep = len(pool)
    if p.top_k > 0:
        keep = min(keep, p.top_k)
    if keep < scores.shape[0] or p.top_p < 1:
        ranked = _rank_prefix(scores, keep, pool)
    else:
        ranked = np.arange(keep)  # every token: no order needed
    probs = np.exp(scores[ranked] - best)
    probs /= probs.sum()
    if p.top_p < 1:
        # Keep the fewest tokens whose mass reaches top_p: those with mass before them < top_p.
        mass_before = np.cumsum(probs) - probs
        cut = max(1, int(np.count_nonzero(mass_before < p.top_p)))
        ranked, probs = ranked[:cut], probs[:cut]
    order = np.argsort(ranked)
    return ranked[order], probs[order]


def _rank_prefix(scores: np.ndarray, n: int, pool: np.ndarray | None) -> np.ndarray:
    """The first n token ids of `pool` (ascending ids; None: all) in rank order (score
    descending, id ascending)."""
    pool = np.arange(scores.shape[0]) if pool is None else pool
    if n < len(pool):
        # Every token scoring at least the n-th best score, ties included, then ranked.
        nth = -np.partition(-scores[pool], n - 1)[n - 1]
        pool = pool[scores[pool] >= nth]
    order = np.argsort(-scores[pool], kind="stable")  # stable: ids ascending on ties
    return pool[order[:n]]


def processed_distribution(row: np.ndarray, sampler: Sampler, penalties: bool = True):
    """The distribution [vocab] that sampling this row draws from, given the sampler's state:
    one-hot at the argmax for greedy. Speculative decoding's acceptance rule needs it whole.

    penalties: apply logit_bias, the penalties and the constraint first (False for a draft
        model's proposals, which any distribution serves).
    """
    scores = np.asarray(row).astype(np.float64)
    if penalties:
        scores = _constrained(_adjusted(scores, sampler), sampler)
    out = np.zeros(scores.shape[0])
    if sampler.params.temperature == 0:
        out[int(np.argmax(scores))] = 1.0
        return out
    ids, probs = _kept(scores, sampler.params)
    out[ids] = probs / probs.sum()
    return out


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from unnormalized probabilities [vocab] (zero-mass tokens never)."""
    return inverse_cdf(probs, rng.random())


def _logprob(row: np.ndarray, token: int, sampler: Sampler) -> Logprob:
    scores = row.astype(np.float64)
    logprobs = scores - (scores.max() + np.log(np.exp(scores - scores.max()).sum()))
    k = min(sampler.params.logprobs, len(logprobs))
    top: tuple[tuple[int, float], ...] = ()
    if k:
        ids = np.argpartition(-logprobs, k - 1)[:k]
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        top = tuple((int(i), float(logprobs[i])) for i in ids)
    return Logprob(token, float(logprobs[token]), top)

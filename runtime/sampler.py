"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Data in, data out: `Sampler.sample` takes one row of logits and returns a token id, so it is
tested on CPU without a model.
"""

import math
from dataclasses import dataclass

import numpy as np

from relaxlm.errors import RelaxlmError


@dataclass
class SamplingParams:
    """How to generate. temperature=0 is greedy; top_k=0 and top_p=1 switch those filters off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: fresh entropy on every request
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.stop_token_ids, list | tuple | set | frozenset):
            _invalid("stop_token_ids", self.stop_token_ids, "a list of token ids")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _invalid("max_tokens", self.max_tokens, "an integer >= 1")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            _invalid("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            _invalid("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            _invalid("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            _invalid("seed", self.seed, "None or an integer >= 0")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            _invalid("stop_token_ids", self.stop_token_ids, "token ids (integers >= 0)")


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _invalid(field: str, value, expected: str):
    raise RelaxlmError(f"SamplingParams.{field}={value!r} is invalid; set it to {expected}")


class Sampler:
    """Samples the tokens of one request; the same seed and logits give the same tokens."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        """One token id from a [vocab] row of logits."""
        logits = np.asarray(logits)
        if logits.ndim != 1:
            raise ValueError(f"sample takes one row of logits, shape [vocab]; got {logits.shape}")
        if np.isnan(logits).any():
            raise ValueError("logits contain NaN; the model's output is broken")
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))

        scores = logits.astype(np.float64) / p.temperature
        ids = np.arange(scores.shape[0])
        if 0 < p.top_k < len(ids):
            ids = np.argpartition(-scores, p.top_k - 1)[: p.top_k]  # the top_k, unordered
        if p.top_p < 1:
            ids = ids[np.argsort(-scores[ids], kind="stable")]  # most likely first
        probs = np.exp(scores[ids] - scores[ids].max())
        probs /= probs.sum()
        if p.top_p < 1:
            # Keep the fewest tokens whose mass reaches top_p: those with mass before them < top_p.
            mass_before = np.cumsum(probs) - probs
            keep = max(1, int(np.count_nonzero(mass_before < p.top_p)))
            ids, probs = ids[:keep], probs[:keep]
        cdf = np.cumsum(probs)
        choice = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(choice, len(ids) - 1)])

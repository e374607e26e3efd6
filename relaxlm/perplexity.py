"""Perplexity of a model over a text, with sliding windows (as Hugging Face documents it).

The text is tokenized once (with the BOS the tokenizer adds); windows of `window` tokens start
every `stride` tokens, and each scores only the tokens the previous window did not (with
stride < window every token after the first is scored once, with at least `window - stride`
tokens of context). Used to judge quantization schemes on real weights.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from relaxlm.errors import RelaxlmError


@dataclass
class Perplexity:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood, nats per token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
        }


def perplexity(llm, text: str, window: int = 512, stride: int = 256) -> Perplexity:
    """Perplexity of `llm` (a relaxlm.LLM) over `text`."""
    return perplexity_of_ids(llm.tokenizer.encode(text), _scorer(llm), window, stride)


def perplexity_of_ids(ids: list[int], logits_of, window: int, stride: int) -> Perplexity:
    """Perplexity over token ids; logits_of(ids) -> next-token logits after each id [n, vocab].

    Any engine plugs in through `logits_of` (llama.cpp's, in the comparison scripts).
    """
    if not 0 < stride <= window:
        raise RelaxlmError(f"perplexity: stride {stride} must be in 1..window ({window})")
    if len(ids) < 2:
        raise RelaxlmError("perplexity: the text is shorter than two tokens")
    total, count, scored_to = 0.0, 0, 1  # ids[0] has no context: never scored
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        if end <= scored_to:
            break
        logits = np.asarray(logits_of(ids[begin:end]), dtype=np.float64)  # [end - begin, vocab]
        # row j predicts ids[begin + j + 1]; score the targets in [first, end): a window's first
        # token has no context in it (stride == window leaves it unscored, as HF's recipe does)
        first = max(scored_to, begin + 1)
        rows = logits[first - begin - 1 : end - begin - 1]
        targets = np.asarray(ids[first:end])
        top = rows.max(axis=1, keepdims=True)
        log_z = (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))[:, 0]
        total += float((log_z - rows[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        scored_to = end
    return Perplexity(tokens=count, nll=total / count)


def _scorer(llm):
    def logits_of(ids: list[int]) -> np.ndarray:
        return llm.score(ids, prefill=len(ids), every_token=True)[: len(ids)]

    return logits_of

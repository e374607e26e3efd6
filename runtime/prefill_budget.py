"""How many prompt tokens one engine step computes (chunked prefill's token budget).

A step runs every decoding sequence's next token and, within the budget, prompt tokens; until
it ends, no stream gets a token. A fixed budget trades those streams' latency for the new
prompt's time to first token in a way that depends on the machine and the model: the
artifact's 1024-token chunk held the other streams 246 ms per step on a small model on 2 CPU
cores, and would hold them seconds on a slow kernel path.

So by default the budget follows a latency target: while any sequence is decoding, a step gets
as many prompt tokens as fit in `step_target_s` at the measured cost of recent steps (whole
steps: the decode rows and fixed costs count, as the waiting streams see them); with nothing
decoding there is no one to wait, and a step takes the whole chunk (the fastest prefill).
Steps cost about F + c*n for n prompt tokens; sizing the next step as n * target / t(n)
converges to F + c*n = target whenever F < target, and follows changes (longer contexts make
attention dearer; other load on the machine) within a few steps.
"""

from dataclasses import dataclass

# The pause that decoding streams see while a long prompt is computed, at most: about a token
# every tenth of a second, which is still smooth reading, for a small loss of prefill speed.
DEFAULT_STEP_TARGET_S = 0.1
# Fewer tokens per forward and the prefill's own speed drops sharply (weights are read once
# per forward): a floor keeps a long prompt moving however slow the machine.
MIN_ADAPTIVE_TOKENS = 32
_SMOOTHING = 0.5  # weight of the newest step in the running per-token cost


@dataclass
class PrefillBudget:
    """The prompt-token budget of each step.

    cap: the most in one step (the artifact's prefill chunk, or the user's max_prefill_tokens).
    step_target_s: the step time to aim at while sequences decode; None for a fixed budget of
        `cap` tokens every step.
    """

    cap: int
    step_target_s: float | None = DEFAULT_STEP_TARGET_S
    seconds_per_token: float | None = None  # recent steps' time per prompt token, smoothed

    def tokens(self, decoding: bool) -> int:
        """The budget of the next step; `decoding`: whether any sequence waits on it for a token."""
        if self.step_target_s is None or not decoding or self.seconds_per_token is None:
            return self.cap
        fit = int(self.step_target_s / self.seconds_per_token)
        return max(min(MIN_ADAPTIVE_TOKENS, self.cap), min(fit, self.cap))

    def observe(self, tokens: int, seconds: float) -> None:
        """A step with `tokens` prompt tokens took `seconds`."""
        if tokens <= 0 or seconds <= 0:
            return
        cost = seconds / tokens
        old = self.seconds_per_token
        self.seconds_per_token = cost if old is None else old + _SMOOTHING * (cost - old)

"""What the engine measures, for `LLM.metrics()` and a server's /metrics.

Counters only grow; gauges are the state after the engine's latest change; latencies are
histograms with fixed buckets (Prometheus' shape: cumulative counts per upper bound, a sum and
a count), so a scraper can compute rates and quantiles without the raw samples.
"""

import bisect
from dataclasses import dataclass, field

# Seconds; from 1 ms to 2 minutes, roughly x2.5 apart.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


@dataclass
class Histogram:
    """Observations counted per bucket; `counts[i]` counts values <= bounds[i] (and above the
    previous bound), the last entry counts values above every bound."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it), ending with (inf, count): Prometheus buckets."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (an over-estimate within a bucket)."""
        if not self.count:
            return None
        rank = q * self.count
        for bound, total in self.cumulative():
            if total >= rank:
                return bound
        return float("inf")

    def copy(self) -> "Histogram":
        return Histogram(self.bounds, list(self.counts), self.sum, self.count)


@dataclass
class EngineMetrics:
    """A snapshot of the engine: gauges, counters since start, latency histograms (seconds)."""

    # gauges
    waiting: int = 0  # sequences queued for a batch slot (queue length)
    running: int = 0  # sequences in the running batch
    kv_pages_total: int = 0
    kv_pages_free: int = 0
    kv_pages_cached: int = 0  # held only by the prefix cache; given back on demand
    page_size: int = 0  # tokens per page
    kv_cache_tokens: int = 0  # tokens the KV cache's pages hold, all sequences together
    kv_cache_bytes: int = 0  # bytes of those pages, all layers (the manifest's bytes per token)
    # counters
    requests_submitted: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0  # tokens of submitted prompts
    # Tokens computed other than each decode's newest token: prompts (less prefix-cache hits)
    # and sequences recomputed after preemption.
    prefill_tokens: int = 0
    prefix_cache_hit_tokens: int = 0  # prompt tokens taken from the prefix cache instead
    generated_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    # Speculative decoding: tokens drafted and verified, and those of them the target accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    # latencies
    time_to_first_token: Histogram = field(default_factory=Histogram)
    inter_token_latency: Histogram = field(default_factory=Histogram)

    @property
    def draft_acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens; None before any draft."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def kv_pages_used(self) -> int:
        return self.kv_pages_total - self.kv_pages_free

    def copy(self) -> "EngineMetrics":
        return EngineMetrics(
            **{
                **self.__dict__,
                "time_to_first_token": self.time_to_first_token.copy(),
                "inter_token_latency": self.inter_token_latency.copy(),
            }
        )

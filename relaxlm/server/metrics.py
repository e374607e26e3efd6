"""/metrics: the engine's snapshot (runtime/metrics.py) and the server's request counts as
Prometheus text, through prometheus-client.

Each app has its own registry (two servers in one process, as in tests, never share counts).
Engine figures are read from `Engine.metrics()` at scrape time by a collector, so nothing is
counted twice and a scrape never waits on compute.
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from relaxlm.runtime.metrics import EngineMetrics, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The registry behind /metrics: request counts here, engine figures from `snapshot`.

    snapshot: returns the engine's EngineMetrics, or None for a model without an engine
        (an embedding model).
    """

    def __init__(self, snapshot: Callable[[], EngineMetrics | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "relaxlm_http_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(snapshot))

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, snapshot: Callable[[], EngineMetrics | None]):
        self.snapshot = snapshot

    def describe(self):
        return []  # collected fresh on every scrape

    def collect(self):
        m = self.snapshot()
        if m is None:
            return
        yield _gauge("relaxlm_num_requests_waiting", "sequences queued for a batch slot", m.waiting)
        yield _gauge("relaxlm_num_requests_running", "sequences in the running batch", m.running)
        yield _gauge("relaxlm_kv_pages_total", "pages in the paged KV cache", m.kv_pages_total)
        yield _gauge("relaxlm_kv_pages_free", "KV-cache pages free", m.kv_pages_free)
        yield _gauge(
            "relaxlm_kv_cache_tokens", "tokens the KV cache's pages hold", m.kv_cache_tokens
        )
        yield _gauge("relaxlm_kv_cache_bytes", "bytes of the KV cache's pages", m.kv_cache_bytes)
        yield _gauge(
            "relaxlm_kv_pages_cached",
            "KV-cache pages held only by the prefix cache (given back on demand)",
            m.kv_pages_cached,
        )
        yield _gauge(
            "relaxlm_kv_pages_held",
            "KV-cache pages held by live sequences (0 when no request runs)",
            m.kv_pages_used - m.kv_pages_cached,
        )
        usage = m.kv_pages_used / m.kv_pages_total if m.kv_pages_total else 0.0
        yield _gauge("relaxlm_kv_cache_usage_ratio", "fraction of KV-cache pages in use", usage)
        for name, doc, value in (
            ("requests_submitted", "requests the engine accepted", m.requests_submitted),
            ("requests_finished", "requests that ran to the end", m.requests_finished),
            ("requests_aborted", "requests cancelled (client gone, or abort)", m.requests_aborted),
            ("prompt_tokens", "prompt tokens submitted (tokens in)", m.prompt_tokens),
            ("generation_tokens", "tokens generated (tokens out)", m.generated_tokens),
            (
                "prefix_cache_hit_tokens",
                "prompt tokens reused from the cache",
                m.prefix_cache_hit_tokens,
            ),
            ("preemptions", "sequences preempted to free KV pages", m.preemptions),
            ("spec_draft_tokens", "speculative tokens drafted and verified", m.draft_tokens),
            (
                "spec_accepted_tokens",
                "speculative draft tokens the target model accepted",
                m.accepted_draft_tokens,
            ),
        ):
            counter = CounterMetricFamily(f"relaxlm_{name}", doc)
            counter.add_metric([], value)
            yield counter
        yield _histogram(
            "relaxlm_time_to_first_token_seconds",
            "from arrival to the first generated token",
            m.time_to_first_token,
        )
        yield _histogram(
            "relaxlm_inter_token_latency_seconds",
            "between consecutive tokens of a sequence",
            m.inter_token_latency,
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else repr(float(b)), n) for b, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)

"""Prometheus metrics: what the API observes per request, and what the engine and the adapter manager count.

Counters and histograms of requests are updated where they happen (prometheus_client is thread-safe). The engine's
and the adapter manager's own counts (steps, adapter reads, lookups, evictions) and the gauges that mirror their
state (queue depth, running requests, KV usage, device slots) are read at scrape time by a collector, so the engine
thread pays nothing for them and the layers below the server never name its metric objects.
"""

from __future__ import annotations

from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..adapters.stats import BucketCounts
from .engine import Engine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loradock_requests", "Finished requests by model (base or adapter) and status", ["model", "status"], registry=r
        )
        self.prompt_tokens = Counter("loradock_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("loradock_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram(
            "loradock_time_to_first_token_seconds", "Time to first token", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "loradock_time_per_output_token_seconds", "Time per output token after the first", ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r,
        )
        self.e2e = Histogram(
            "loradock_e2e_request_latency_seconds", "End-to-end request latency", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))


class _EngineCollector:
    """The engine's and the adapter manager's counts and state, read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        engine = self.engine
        scheduler, cache = engine.scheduler, engine.cache
        yield _histogram("loradock_batch_tokens", "Tokens per engine step", engine.batch_tokens)
        yield _gauge("loradock_queue_depth", "Requests waiting to run", len(scheduler.waiting))
        yield _gauge("loradock_running_requests", "Requests in the running batch", len(scheduler.running))
        yield _gauge("loradock_kv_cache_usage_ratio", "Share of KV cache blocks in use", cache.usage)
        yield _gauge("loradock_kv_cache_blocks_total", "KV cache blocks", cache.num_blocks)
        yield _gauge("loradock_preemptions", "Requests preempted for KV space since start", scheduler.num_preemptions)
        adapters = engine.adapters
        total = engine.config.max_gpu_adapters
        yield _gauge("loradock_adapter_slots_used", "Device adapter slots holding an adapter",
                     total - len(adapters.free_slots) if adapters else 0)
        yield _gauge("loradock_adapter_slots_total", "Device adapter slots", total)
        yield _gauge("loradock_adapters_host_cached", "Adapters in the host cache", len(adapters.host) if adapters else 0)
        if adapters is None:
            return
        stats = adapters.stats
        loads = CounterMetricFamily("loradock_adapter_loads", "Adapters read from disk and validated")
        loads.add_metric([], stats.loads)
        yield loads
        yield _histogram("loradock_adapter_load_seconds", "Time to read and validate an adapter", stats.load_seconds)
        evictions = CounterMetricFamily("loradock_adapter_evictions", "Adapters evicted, by tier", labels=["tier"])
        for tier, count in dict(stats.evictions).items():
            evictions.add_metric([tier], count)
        yield evictions
        lookups = CounterMetricFamily("loradock_adapter_cache_lookups", "Adapter lookups by tier and result (hit/miss)",
                                      labels=["tier", "result"])
        for (tier, result), count in dict(stats.lookups).items():
            lookups.add_metric([tier, result], count)
        yield lookups


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def _histogram(name: str, documentation: str, data: BucketCounts) -> HistogramMetricFamily:
    counts, total = data.snapshot()
    bounds = [str(float(bound)) for bound in data.bounds] + ["+Inf"]
    return HistogramMetricFamily(name, documentation, buckets=list(zip(bounds, accumulate(counts))), sum_value=total)

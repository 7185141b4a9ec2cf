"""Prometheus metrics, in a registry owned by one app (no process-global state).

Engine figures (queue, running, KV use, token counters) are read from `engine.stats()` at scrape
time by a collector, so nothing polls the engine in the background.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from chatglm_serve.engine.types import EngineStats

PREFIX = "chatglm"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:  # model still loading
            return
        gauges = {
            "requests_waiting": ("Requests waiting to be scheduled.", s.waiting),
            "requests_running": ("Requests being decoded.", s.running),
            "kv_cache_blocks_used": ("KV cache blocks in use.", s.kv_blocks_used),
            "kv_cache_blocks_total": ("KV cache blocks in all.", s.kv_blocks_total),
            "kv_cache_usage_ratio": ("Fraction of the KV cache in use.", s.kv_usage),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = {
            "prompt_tokens": ("Prompt tokens of admitted requests.", s.prompt_tokens_total),
            "prompt_tokens_computed": (
                "Prompt tokens prefilled (not served from the prefix cache).",
                s.prompt_tokens_computed,
            ),
            "generation_tokens": ("Tokens generated.", s.generation_tokens_total),
            "engine_requests_finished": ("Requests the engine finished.", s.requests_finished),
            "prompt_tokens_cached": (
                "Prompt tokens served from the prefix cache.",
                getattr(s, "prompt_tokens_cached", 0),
            ),
            "preemptions": (
                "Sequences preempted (recomputed later).",
                getattr(s, "num_preemptions", 0),
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        gpu = getattr(s, "gpu_memory_allocated_bytes", None)
        if gpu is not None:  # only where the model runs on a GPU
            yield GaugeMetricFamily(
                f"{PREFIX}_gpu_memory_allocated_bytes",
                "GPU memory held by tensors (weights, KV cache, activations) in this process.",
                value=gpu,
            )


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time per output token after the first.",
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "From request arrival to the end of its generation.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(stats))
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        # (read from /proc at scrape time; nothing on platforms without it)
        ProcessCollector(registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

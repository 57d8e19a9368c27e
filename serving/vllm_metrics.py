"""vLLM's metric names beside ours, so that vLLM's Grafana dashboard and autoscalers read this server unchanged.

Names, types, help texts, labels (`model_name`: the served model's name, `engine`: "0") and buckets are vLLM v1's
(vllm/v1/metrics/loggers.py, `PrometheusStatLogger`). Meanings follow vLLM's: a request is one choice of one prompt
(vLLM runs each of `n` as its own engine request); TTFT runs from arrival to a prompt's first token; the time per
output token is observed at each later token (the interval since the previous one); `request_success` counts every
finished choice by its finish reason (stop, length, abort). The scheduler and KV-cache gauges are read from the
engine at scrape time. What this server does not have (prefix caching, speculative decoding) is not exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LABELS = ["model_name", "engine"]
ENGINE = "0"
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's build_1_2_5_buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class SchedulerStats(Protocol):
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int


class _SchedulerCollector(Collector):
    """vLLM's scheduler and KV-cache gauges and its preemption counter, read from the engine when scraped."""

    def __init__(self, stats: Callable[[], SchedulerStats], model_name: str) -> None:
        self._stats = stats
        self._labels = [model_name, ENGINE]

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except RuntimeError:  # the engine is not started yet, or already shut down
            return
        used = stats.num_kv_blocks - stats.num_free_kv_blocks
        usage = used / stats.num_kv_blocks if stats.num_kv_blocks else 0.0
        gauges = [
            ("vllm:num_requests_running", "Number of requests in model execution batches.", stats.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats.num_waiting),
            (
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
                usage,
            ),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
        ]
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(name, documentation, labels=LABELS)
            gauge.add_metric(self._labels, value)
            yield gauge
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=LABELS
        )
        preemptions.add_metric(self._labels, stats.num_preemptions)
        yield preemptions

    def describe(self) -> Iterator[Metric]:
        return iter(())


class VllmMetrics:
    """vLLM's request metrics in `registry`, labelled with the served model's name."""

    def __init__(
        self, registry: CollectorRegistry, stats: Callable[[], SchedulerStats], model_name: str, max_model_len: int
    ) -> None:
        labels = (model_name, ENGINE)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
            return Histogram(name, documentation, LABELS, buckets=buckets, registry=registry).labels(*labels)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, LABELS, registry=registry).labels(*labels)

        lengths = buckets_1_2_5(max_model_len)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*LABELS, "finished_reason"],
            registry=registry,
        )
        self._labels = labels
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lengths
        )
        self.request_params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", lengths
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", TPOT_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        registry.register(_SchedulerCollector(stats, model_name))

    def finished(self, reason: str) -> None:
        self._success.labels(*self._labels, reason).inc()

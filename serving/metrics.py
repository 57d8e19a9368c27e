"""Prometheus metrics of one server (`/metrics`): ours, prefixed `switchboard_`, and vLLM's names beside them
(vllm_metrics.py), recorded by the same timer.

`ServerMetrics` owns its own `CollectorRegistry`, so several apps can live in one process (tests do). Latencies are
recorded by a `GenerationTimer` per HTTP request; request counts by the ASGI `RequestCounter`; the scheduler's and the
KV cache's gauges are read from `engine.stats()` at scrape time, so they are never stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchboard.serving.adapters.metrics import AdapterTiers, AdapterUsage, DeviceStats, HostStats, StoreStats
from switchboard.serving.engine.request import RequestOutput, SamplingParams
from switchboard.serving.vllm_metrics import VllmMetrics

logger = logging.getLogger(__name__)

PREFIX = "switchboard_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class StatsSource(Protocol):
    """What the gauges read: `AsyncEngine.stats()` returns one of these."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int


class _EngineCollector(Collector):
    """Scheduler and KV-cache gauges, read from the engine when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], StatsSource]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except RuntimeError:  # the engine is not started yet, or already shut down
            logger.debug("engine stats unavailable at scrape time", exc_info=True)
            return
        used = stats.num_kv_blocks - stats.num_free_kv_blocks
        ratio = used / stats.num_kv_blocks if stats.num_kv_blocks else 0.0
        yield _gauge("num_requests_running", "Requests being generated (in the running batch).", stats.num_running)
        yield _gauge("num_requests_waiting", "Requests admitted but waiting to be scheduled.", stats.num_waiting)
        yield _gauge("kv_cache_blocks_total", "Blocks in the paged KV cache.", stats.num_kv_blocks)
        yield _gauge("kv_cache_blocks_used", "KV cache blocks held by sequences.", used)
        yield _gauge("kv_cache_usage_ratio", "Fraction of the KV cache blocks in use (0..1).", ratio)
        preemptions = CounterMetricFamily(
            PREFIX + "num_preemptions", "Sequences preempted (blocks freed, recomputed later) since start."
        )
        preemptions.add_metric([], stats.num_preemptions)
        yield preemptions

    def describe(self) -> Iterator[Metric]:
        return iter(())  # values only exist at scrape time; nothing to check for name clashes up front


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


class ServerMetrics:
    """All metrics of one server, in one registry."""

    def __init__(
        self,
        stats: Callable[[], StatsSource],
        *,
        per_adapter: bool = False,
        model_name: str = "",
        max_model_len: int = 2048,
    ) -> None:
        """`per_adapter`: export series labelled with adapter ids (`serve --metrics-per-adapter`); otherwise usage
        is split only into `base` and `other` (every adapter) and no adapter id appears. `model_name` labels vLLM's
        series; `max_model_len` bounds their token-count buckets."""
        self.registry = CollectorRegistry()
        self.vllm = VllmMetrics(self.registry, stats, model_name, max_model_len)
        self.per_adapter = per_adapter
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP requests answered, by route and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        # A streamed response's status (200) is sent before its generation can fail; its error event is counted here.
        self.stream_errors = Counter(
            PREFIX + "stream_errors",
            "Streamed responses (counted as 200 in requests_total) that ended with an error event, by route and the "
            "error's status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between generated tokens of one choice.",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "From a request's arrival to its last token (completed requests).",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.", registry=self.registry
        )
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=self.registry)
        self.adapter_load_seconds = Histogram(
            PREFIX + "adapter_load_seconds",
            "Time to load an adapter from disk into host memory (read, validate, parse), in a worker thread.",
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.adapter_usage = AdapterUsage() if per_adapter else AdapterUsage(top_n=0)
        self.registry.register(self.adapter_usage)
        self.registry.register(_EngineCollector(stats))

    def watch_adapters(self, device: Callable[[], DeviceStats], host: HostStats, store: StoreStats) -> None:
        """Export the adapter tiers (device slots, host LRU, disk store) at scrape time."""
        self.registry.register(AdapterTiers(device, host, store, per_adapter=self.per_adapter))

    def base_weights(self, num_bytes: dict[str, int], quantize: str) -> None:
        """The base model's weight bytes as held (NF4 codes and constants, or dense), by component; fixed at start."""
        gauge = Gauge(
            PREFIX + "base_weight_bytes",
            "Bytes of the base model's weights as held in memory (linear: the projections, NF4 or dense; other: "
            "embeddings, norms, lm_head; total).",
            ["component", "quantize"],
            registry=self.registry,
        )
        for component, value in num_bytes.items():
            gauge.labels(component=component, quantize=quantize).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> GenerationTimer:
        return GenerationTimer(self)


class GenerationTimer:
    """Latencies of one HTTP generation request: TTFT per engine request (prompt), TPOT per choice, and e2e."""

    def __init__(self, metrics: ServerMetrics, arrival: float | None = None) -> None:
        self._metrics = metrics
        self._arrival = time.perf_counter() if arrival is None else arrival
        self._first_token_of_prompt: set[int] = set()
        self._first_token_at: dict[int, float] = {}  # choice -> time of its first token
        self._last_token_at: dict[int, float] = {}  # choice -> time of its latest token
        self.adapter: str | None = None  # the adapter's metrics label (None: the base model)

    def admitted(self, prompt_lengths: list[int], params: SamplingParams | None = None) -> None:
        self._metrics.prompt_tokens.inc(sum(prompt_lengths))
        self._metrics.adapter_usage.record(self.adapter, requests=1, prompt_tokens=sum(prompt_lengths))
        vllm = self._metrics.vllm
        vllm.prompt_tokens.inc(sum(prompt_lengths) * (params.n if params is not None else 1))
        if params is not None:
            for _ in prompt_lengths:
                vllm.request_params_n.observe(params.n)
                vllm.request_params_max_tokens.observe(params.max_tokens)

    def on_output(self, prompt_index: int, choice: int, output: RequestOutput) -> None:
        if not output.new_token_ids and not output.finished:
            return
        now = time.perf_counter()
        vllm = self._metrics.vllm
        self._metrics.generation_tokens.inc(len(output.new_token_ids))
        vllm.generation_tokens.inc(len(output.new_token_ids))
        self._metrics.adapter_usage.record(self.adapter, generation_tokens=len(output.new_token_ids))
        if output.new_token_ids and prompt_index not in self._first_token_of_prompt:
            self._first_token_of_prompt.add(prompt_index)
            self._metrics.time_to_first_token.observe(now - self._arrival)
            vllm.time_to_first_token.observe(now - self._arrival)
        if output.new_token_ids:
            self._first_token_at.setdefault(choice, now)
            last = self._last_token_at.get(choice)
            if last is not None:  # vLLM: one interval per later token
                for _ in output.new_token_ids:
                    vllm.time_per_output_token.observe((now - last) / len(output.new_token_ids))
            self._last_token_at[choice] = now
        if output.finished and output.completion_tokens > 1 and choice in self._first_token_at:
            elapsed = now - self._first_token_at[choice]
            self._metrics.time_per_output_token.observe(elapsed / (output.completion_tokens - 1))
        if output.finished:
            vllm.finished(output.finish_reason.value if output.finish_reason is not None else "stop")
            vllm.e2e_request_latency.observe(now - self._arrival)
            vllm.request_prompt_tokens.observe(output.prompt_tokens)
            vllm.request_generation_tokens.observe(output.completion_tokens)

    def completed(self) -> None:
        self._metrics.e2e_request_latency.observe(time.perf_counter() - self._arrival)


class RequestCounter:
    """ASGI middleware counting answered requests by route template (`endpoint`) and status code.

    Pure ASGI (not `BaseHTTPMiddleware`), so streaming responses and client-disconnect detection are untouched.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

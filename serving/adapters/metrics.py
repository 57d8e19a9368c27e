"""Adapter metrics: usage by adapter with bounded label cardinality, the three cache tiers, and vLLM's
`vllm:lora_requests_info` gauge (which Kubernetes LoRA-affinity routers read).

Adapter ids name tenants' adapters, so by default none reaches `/metrics`: usage is exported as `base` (no adapter)
and `other` (every adapter), and vLLM's gauge is left out. With `serve --metrics-per-adapter`, per-adapter counts
are kept in memory for every adapter; at scrape time the busiest `top_n` (by requests) are exported under their own
`adapter` label and the rest summed under `other`, so a store of thousands of adapters stays a few dozen series. (An
adapter moving into the top N moves its counts out of `other`, which then drops: a counter reset to Prometheus'
`rate`.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "switchboard_"
OTHER = "other"
BASE = "base"  # requests that use no adapter


@dataclass(slots=True)
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class AdapterUsage(Collector):
    """Requests, prompt and generated tokens by adapter; the busiest `top_n` by name (0: none), the rest as
    `other`."""

    def __init__(self, top_n: int = 20) -> None:
        self.top_n = top_n
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    def record(self, adapter: str | None, *, requests: int = 0, prompt_tokens: int = 0, generation_tokens: int = 0):
        with self._lock:
            u = self._usage.setdefault(adapter or BASE, _Usage())
            u.requests += requests
            u.prompt_tokens += prompt_tokens
            u.generation_tokens += generation_tokens

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            items = [
                (name, _Usage(u.requests, u.prompt_tokens, u.generation_tokens)) for name, u in self._usage.items()
            ]
        shown = [item for item in items if item[0] == BASE]  # the base model never counts against N
        adapters = sorted((item for item in items if item[0] != BASE), key=lambda item: (-item[1].requests, item[0]))
        shown += adapters[: self.top_n]
        rest = adapters[self.top_n :]
        if rest:
            other = _Usage()
            for _, u in rest:
                other.requests += u.requests
                other.prompt_tokens += u.prompt_tokens
                other.generation_tokens += u.generation_tokens
            shown.append((OTHER, other))
        fields = (
            (
                "adapter_requests",
                "Generation requests admitted, by adapter (busiest N by name, the rest `other`).",
                "requests",
            ),
            ("adapter_prompt_tokens", "Prompt tokens of admitted requests, by adapter.", "prompt_tokens"),
            ("adapter_generation_tokens", "Tokens generated, by adapter.", "generation_tokens"),
        )
        for name, doc, attr in fields:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["adapter"])
            for adapter, u in shown:
                family.add_metric([adapter], getattr(u, attr))
            yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class DeviceStats(Protocol):
    max_resident: int
    resident: int
    loads: int
    hits: int
    evictions: int
    running: list[str]
    waiting: list[str]


class HostStats(Protocol):
    hits: int
    misses: int
    loads: int
    evictions: int

    def __len__(self) -> int: ...


class StoreStats(Protocol):
    def entries(self) -> list: ...

    def size_bytes(self) -> int: ...


def public_name(engine_name: str) -> str:
    """`owner/id@sha` (a stored version) -> `id`; start-up adapter names as they are."""
    return engine_name.split("@", 1)[0].split("/", 1)[-1]


class AdapterTiers(Collector):
    """Cache hits, misses, loads and evictions per tier, residents per tier, store size, vLLM's LoRA info gauge."""

    def __init__(
        self, device: Callable[[], DeviceStats], host: HostStats, store: StoreStats, *, per_adapter: bool
    ) -> None:
        self._device, self._host, self._store = device, host, store
        self._per_adapter = per_adapter  # vLLM's gauge names the running adapters: only when names may be shown

    def collect(self) -> Iterator[Metric]:
        try:
            d = self._device()
        except RuntimeError:
            return
        h = self._host
        counters = (
            ("adapter_cache_hits", "Adapter lookups served by the tier without a load.", d.hits, h.hits),
            ("adapter_cache_misses", "Adapter lookups the tier had to load.", d.loads, h.misses),
            (
                "adapter_cache_loads",
                "Adapters loaded into the tier (device: copied into a slot; host: parsed from disk).",
                d.loads,
                h.loads,
            ),
            (
                "adapter_cache_evictions",
                "Adapters evicted from the tier (least recently used, unreferenced).",
                d.evictions,
                h.evictions,
            ),
        )
        for name, doc, device_value, host_value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["tier"])
            family.add_metric(["device"], device_value)
            family.add_metric(["host"], host_value)
            yield family
        resident = GaugeMetricFamily(PREFIX + "adapters_resident", "Adapters held per tier.", labels=["tier"])
        resident.add_metric(["device"], d.resident)
        resident.add_metric(["host"], len(h))
        resident.add_metric(["disk"], len(self._store.entries()))
        yield resident
        yield GaugeMetricFamily(
            PREFIX + "adapter_store_bytes", "Bytes of adapter versions on disk.", value=self._store.size_bytes()
        )
        if not self._per_adapter:
            return
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests (value: the time of the sample, as vLLM reports it).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [
                str(d.max_resident),
                ",".join(sorted({public_name(n) for n in d.running})),
                ",".join(sorted({public_name(n) for n in d.waiting})),
            ],
            time.time(),
        )
        yield info

    def describe(self) -> Iterator[Metric]:
        return iter(())

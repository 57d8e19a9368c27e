"""`/metrics` across replicas: each replica's Prometheus text, every sample labelled `replica`, merged into one page.

Each replica pushes its labelled families to one named Ray actor (`MetricsBoard`) every second and when scraped; a
scrape through the proxy lands on one replica, which answers the board's merge of every live replica's families.
A replica that stopped pushing (killed, scaled down) leaves the page after `STALE_AFTER_S`.
"""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

BOARD_NAME = "switchboard-metrics-board"
REPLICA_LABEL = "replica"
STALE_AFTER_S = 15.0


def label_families(text: str, replica: str) -> list[Metric]:
    """The families of one replica's exposition `text`, each sample with `replica="<replica>"` added."""
    families = list(text_string_to_metric_families(text))
    for family in families:
        family.samples = [
            sample._replace(labels={**sample.labels, REPLICA_LABEL: replica}) for sample in family.samples
        ]
    return families


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_families(per_replica: list[list[Metric]]) -> bytes:
    """One exposition page: each family once (first replica's help and type), the samples of every replica."""
    merged: dict[str, Metric] = {}
    for families in per_replica:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            into.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)


class MetricsBoard:
    """The latest labelled families of every replica (a Ray actor: one per cluster, named `BOARD_NAME`)."""

    def __init__(self) -> None:
        self._pages: dict[str, tuple[float, list[Metric]]] = {}

    def push(self, replica: str, families: list[Metric]) -> None:
        self._pages[replica] = (time.monotonic(), families)

    def remove(self, replica: str) -> None:
        self._pages.pop(replica, None)

    def render(self) -> bytes:
        now = time.monotonic()
        self._pages = {r: page for r, page in self._pages.items() if now - page[0] < STALE_AFTER_S}
        return merge_families([families for _, (_, families) in sorted(self._pages.items())])

    def replicas(self) -> list[str]:
        return sorted(self._pages)

"""The host tier: an LRU of parsed adapters between the disk store and the device slots.

Parsing (reading and validating safetensors) runs in a worker thread, never on the step loop: the API awaits
`get` before the request enters the engine, and hands the parsed adapter over with it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from switchboard.adapters_store.kinds import Adapter


class HostCache:
    def __init__(self, capacity: int, on_load: Callable[[float], None] | None = None) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Adapter] = OrderedDict()
        self._lock = threading.Lock()
        self._on_load = on_load
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str, load: Callable[[], Adapter]) -> Adapter:
        """The parsed adapter `key`, parsed by `load` on a miss (call from a worker thread)."""
        with self._lock:
            adapter = self._items.get(key)
            if adapter is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return adapter
            self.misses += 1
        start = time.perf_counter()
        adapter = load()
        elapsed = time.perf_counter() - start
        with self._lock:
            self.loads += 1
            if self._on_load is not None:
                self._on_load(elapsed)
        self.put(key, adapter)
        return adapter

    def put(self, key: str, adapter: Adapter) -> None:
        with self._lock:
            self._items[key] = adapter
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                self.evictions += 1

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

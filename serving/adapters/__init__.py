"""Adapters at serve time, in one place: where an adapter lives between an upload and a decode step.

- `host_cache.py`: the host tier, an LRU of parsed adapters between the disk store (adapters_store/) and the device.
- `served.py`: `ServedAdapters`, the only adapter object the engine speaks to: registration, residency (residency.py:
  an LRU of device slots per kind with one reference count, the running sequences), and each step's batch.
- `layouts/`: one device layout per kind (stacked slot tensors, load into a slot, apply to a linear or the cache).
- `batch.py`: one step's segments per kind, handed to every linear of the model.
- `merge.py`: `--merge-adapter`, folding one adapter into the base weights.
- `metrics.py`: usage by adapter and the three cache tiers for `/metrics`.

Adding a kind: its parsing in adapters_store/kinds/ and its device layout in layouts/.
"""

from .host_cache import HostCache
from .merge import merge_into
from .served import ServedAdapters, SlotStats, UnknownAdapter

__all__ = ["HostCache", "ServedAdapters", "SlotStats", "UnknownAdapter", "merge_into"]

"""The adapters an engine serves: registered ones, their device slots, and each step's adapter batch.

This is the one object the engine speaks to about adapters. The life of an adapter:
`resolve` (a start-up adapter, or one an upload hands over; the sequence carries it) -> `acquire` when its sequence
is admitted (registered if new, then a slot of its kind: a hit, or a load into a free or least-recently-used unheld
slot) -> `batch` every step (the segments each linear applies) -> `release` when the sequence stops running.
Start-up adapters stay registered; any other leaves the registry once nothing runs on it and it is either retired
(an old version, a deleted adapter) or evicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from switchboard.adapters_store.kinds import Adapter, AdapterKind, PrefixAdapter
from switchboard.kernels.backend import AdapterKernels

from ..models.linear import AdapterLinear
from .batch import AdapterBatch, StepBatches
from .layouts import DeviceLayout, PrefixLayout, Stacks, make_layouts
from .residency import SlotPool

if TYPE_CHECKING:
    from ..engine.scheduler import ScheduledSeq
    from ..engine.sequence import Sequence

log = logging.getLogger(__name__)


class UnknownAdapter(KeyError):
    """A request named an adapter this engine does not hold."""


@dataclass(slots=True)
class SlotStats:
    max_resident: int  # slots per kind
    resident: int
    loads: int
    hits: int
    evictions: int


class ServedAdapters:
    def __init__(
        self,
        startup: dict[str, Adapter],
        linears: list[AdapterLinear],
        max_resident: int,
        dtype: torch.dtype,
        device: torch.device,
        kernels: AdapterKernels,
        code_lora_slots: bool = True,
    ) -> None:
        self.max_resident = max_resident
        self.layouts: dict[AdapterKind, DeviceLayout] = make_layouts(
            Stacks(max_resident, dtype, device), linears, code_lora_slots
        )
        self.pools = {kind: SlotPool(max_resident) for kind in AdapterKind}
        self.adapters: dict[str, Adapter] = {}  # registered: their stacks exist
        self.pinned = set(startup)  # start-up adapters never leave
        self.retired: set[str] = set()  # leave once nothing runs on them
        self.steps = StepBatches(self.layouts, kernels, device)
        self.num_loads = self.num_hits = self.num_evictions = 0
        for adapter in startup.values():
            self.register(adapter)

    # ---- registry (between steps) -----------------------------------------------------------------------------
    def register(self, adapter: Adapter) -> None:
        """Make `adapter` acquirable, allocating the stacks it needs that do not exist yet."""
        self.layouts[adapter.kind].register(adapter)
        self.adapters[adapter.name] = adapter

    def resolve(self, name: str, offered: Adapter | None = None) -> Adapter:
        """The adapter a new request names: the registered one, else `offered` (an upload the API parsed; registered
        when its sequence is admitted). UnknownAdapter if neither."""
        known = self.adapters.get(name)
        if known is None and offered is not None and offered.name == name:
            known = offered
        if known is None:
            raise UnknownAdapter(name)
        self.retired.discard(name)
        return known

    def retire(self, name: str) -> None:
        """An old version or a deleted adapter: sequences running on it finish, then it leaves."""
        if name in self.pinned:
            return
        self.retired.add(name)
        self._maybe_forget(name)

    def registered(self) -> list[str]:
        return list(self.adapters)

    # ---- residency ---------------------------------------------------------------------------------------------
    def acquire(self, seq: Sequence) -> bool:
        """Give an admitted sequence its adapter's slot (loading it if needed). False: every slot of its kind is held
        by running sequences, so it waits. Raises what loading raised, leaving the adapter not resident."""
        adapter = seq.adapter
        if adapter is None:
            return True
        registered_now = adapter.name not in self.adapters  # new, or it left while its sequence waited
        if registered_now:
            self.register(adapter)
        pool = self.pools[adapter.kind]
        slot = pool.lookup(adapter.name)
        if slot is not None:
            self.num_hits += 1
        else:
            placed = pool.place(adapter.name)
            if placed is None:
                if registered_now:  # nothing of it is on the device yet; its sequence keeps it while it waits
                    del self.adapters[adapter.name]
                return False
            slot, evicted = placed
            if evicted is not None:
                self.num_evictions += 1
                self.layouts[adapter.kind].drop(evicted)
                self._maybe_forget(evicted)
            try:
                self.num_loads += 1
                self.layouts[adapter.kind].load(adapter, slot)
            except BaseException:  # a half-loaded slot must not be found resident by the next request
                pool.remove(adapter.name)
                self.layouts[adapter.kind].drop(adapter.name)
                raise
        pool.hold(adapter.name)
        seq.adapter_slot = slot
        return True

    def release(self, seq: Sequence) -> None:
        """The sequence stopped running (finished, failed or preempted): its hold on the slot goes."""
        if seq.adapter is None or seq.adapter_slot < 0:
            return
        seq.adapter_slot = -1
        name = seq.adapter.name
        if not self.pools[seq.adapter.kind].release(name):
            self._maybe_forget(name)

    def is_resident(self, name: str) -> bool:
        adapter = self.adapters.get(name)
        return adapter is not None and name in self.pools[adapter.kind].resident

    def stats(self) -> SlotStats:
        resident = sum(len(p.resident) for p in self.pools.values())
        return SlotStats(self.max_resident, resident, self.num_loads, self.num_hits, self.num_evictions)

    def _maybe_forget(self, name: str) -> None:
        """Drop `name` from the registry once nothing runs on it and it is retired or no longer resident."""
        adapter = self.adapters.get(name)
        if adapter is None or name in self.pinned:
            return
        pool = self.pools[adapter.kind]
        if pool.held(name):
            return
        if name in self.retired or name not in pool.resident:
            pool.remove(name)
            self.layouts[adapter.kind].drop(name)
            del self.adapters[name]
            self.retired.discard(name)

    # ---- per step ----------------------------------------------------------------------------------------------
    def batch(self, scheduled: list[ScheduledSeq]) -> AdapterBatch | None:
        """The step's adapter work for every linear; None when no scheduled token uses a linear kind."""
        return self.steps.batch(scheduled)

    def write_prefix(self, seq: Sequence, cache: torch.Tensor, cache_slots: torch.Tensor) -> None:
        """Write an admitted prefix sequence's virtual keys and values into its first cache positions."""
        assert isinstance(seq.adapter, PrefixAdapter)
        layout = self.layouts[AdapterKind.PREFIX]
        assert isinstance(layout, PrefixLayout)
        layout.write(seq.adapter.name, cache, cache_slots)

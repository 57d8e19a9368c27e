"""Which adapters hold a device slot, and who holds them: an LRU per kind with one reference count per adapter.

The count is the number of running sequences on the adapter; a counted adapter keeps its slot, an uncounted one is
evicted least recently used first when another needs a slot. Waiting sequences hold no count: each carries its parsed
adapter (`Sequence.adapter`), so an adapter may leave the device, and even the registry, while they wait, and is
loaded again when they are admitted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class SlotPool:
    """LRU over one kind's `size` slots, with each resident adapter's count of running sequences."""

    size: int
    resident: OrderedDict[str, int] = field(default_factory=OrderedDict)  # name -> slot, least recent first
    refs: dict[str, int] = field(default_factory=dict)

    def lookup(self, name: str) -> int | None:
        slot = self.resident.get(name)
        if slot is not None:
            self.resident.move_to_end(name)
        return slot

    def place(self, name: str) -> tuple[int, str | None] | None:
        """A slot for `name` (free, or the LRU unreferenced one) and the name it evicts; None if all are held."""
        used = set(self.resident.values())
        for slot in range(self.size):
            if slot not in used:
                self.resident[name] = slot
                return slot, None
        for victim, slot in self.resident.items():
            if self.refs.get(victim, 0) == 0:
                del self.resident[victim]
                self.refs.pop(victim, None)
                self.resident[name] = slot
                return slot, victim
        return None

    def hold(self, name: str) -> None:
        self.refs[name] = self.refs.get(name, 0) + 1

    def release(self, name: str) -> int:
        """Drop one reference; the references left."""
        left = self.refs[name] - 1
        if left:
            self.refs[name] = left
        else:
            del self.refs[name]
        return left

    def held(self, name: str) -> bool:
        return name in self.refs

    def remove(self, name: str) -> None:
        self.resident.pop(name, None)
        self.refs.pop(name, None)

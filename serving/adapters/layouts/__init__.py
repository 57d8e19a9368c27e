"""One device layout per adapter kind (see base.py); `make_layouts` builds them all for a model."""

from __future__ import annotations

from switchboard.adapters_store.kinds import AdapterKind

from ...models.linear import AdapterLinear
from .base import DeviceLayout, LinearLayout, Stacks
from .ia3 import IA3Layout
from .krona import KronaLayout
from .lora import LoraLayout
from .prefix import PrefixLayout

__all__ = ["DeviceLayout", "IA3Layout", "KronaLayout", "LinearLayout", "LoraLayout", "PrefixLayout", "Stacks"]


def make_layouts(
    stacks: Stacks, linears: list[AdapterLinear], code_lora_slots: bool
) -> dict[AdapterKind, DeviceLayout]:
    layouts: list[DeviceLayout] = [
        LoraLayout(stacks, linears, code_slots=code_lora_slots),
        KronaLayout(stacks),
        IA3Layout(stacks),
        PrefixLayout(stacks),
    ]
    assert {layout.kind for layout in layouts} == set(AdapterKind), "every kind needs a device layout"
    return {layout.kind: layout for layout in layouts}

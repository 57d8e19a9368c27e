"""What every kind's device layout offers: the stacks its adapters are copied into, one slot per resident adapter.

A layout owns the device tensors of one kind. `register` allocates what a new adapter needs (between steps; the
forward pass never allocates), `load` copies an adapter's scale-folded tensors into a slot, `drop` forgets what a
layout keeps per adapter outside the stacks. Kinds that act inside the linears also apply the step's segments to a
linear's input and output; the prefix kind acts through the KV cache instead (prefix.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from switchboard.adapters_store.kinds import Adapter, AdapterKind
from switchboard.kernels.backend import AdapterKernels
from switchboard.kernels.segments import Segments

from ...models.linear import AdapterLinear

Site = tuple[int, str]  # (layer, module)


@dataclass(frozen=True, slots=True)
class Stacks:
    """Where a layout allocates: `size` slots of `dtype` on `device`."""

    size: int
    dtype: torch.dtype
    device: torch.device

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(self.size, *shape, dtype=self.dtype, device=self.device)

    def ones(self, *shape: int) -> torch.Tensor:
        return torch.ones(self.size, *shape, dtype=self.dtype, device=self.device)


class DeviceLayout(Protocol):
    kind: AdapterKind
    in_linears: bool  # acts inside the linears (per-step segments); False: through the KV cache

    def register(self, adapter: Adapter) -> None: ...

    def load(self, adapter: Adapter, slot: int) -> None: ...

    def drop(self, name: str) -> None: ...


class LinearLayout(DeviceLayout, Protocol):
    """A kind that changes the linears: given the step's segments of its kind, it scales a linear's input or adds to
    (or scales) its output, in place where it can."""

    def transform_input(
        self, kernels: AdapterKernels, linear: AdapterLinear, x: torch.Tensor, seg: Segments
    ) -> torch.Tensor: ...

    def add_output(
        self, kernels: AdapterKernels, linear: AdapterLinear, x: torch.Tensor, y: torch.Tensor, seg: Segments
    ) -> None: ...


class AdditiveLayout:
    """Defaults for kinds that only add to a linear's output (LoRA, KronA): the input passes unchanged, and nothing
    is kept per adapter outside the stacks."""

    def drop(self, name: str) -> None:
        return None

    def transform_input(
        self, kernels: AdapterKernels, linear: AdapterLinear, x: torch.Tensor, seg: Segments
    ) -> torch.Tensor:
        return x

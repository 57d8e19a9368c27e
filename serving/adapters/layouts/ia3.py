"""(IA)3 slots: per (layer, module) `V [S, n]`, initialised to ones (the identity) where a slot's adapter has no
vector. Attention targets (k, v) scale a linear's output; feed-forward targets (down_proj) scale its input."""

from __future__ import annotations

import torch

from switchboard.adapters_store.kinds import AdapterKind, IA3Adapter
from switchboard.kernels.backend import AdapterKernels
from switchboard.kernels.segments import Segments

from ...models.linear import AdapterLinear
from .base import Site, Stacks


class IA3Layout:
    kind = AdapterKind.IA3
    in_linears = True

    def __init__(self, stacks: Stacks) -> None:
        self.stacks = stacks
        self.vectors: dict[Site, torch.Tensor] = {}
        self.input_sites: set[Site] = set()

    def register(self, adapter: IA3Adapter) -> None:
        for site, (vec, side) in adapter.vectors.items():
            if site not in self.vectors:
                self.vectors[site] = self.stacks.ones(vec.numel())
            if side == "input":
                self.input_sites.add(site)

    def load(self, adapter: IA3Adapter, slot: int) -> None:
        for site, V in self.vectors.items():
            V[slot].fill_(1.0)
            if site in adapter.vectors:
                V[slot] = adapter.vectors[site][0].to(self.stacks.device, self.stacks.dtype)

    def drop(self, name: str) -> None:
        return None

    def transform_input(
        self, kernels: AdapterKernels, linear: AdapterLinear, x: torch.Tensor, seg: Segments
    ) -> torch.Tensor:
        for part in linear.parts:
            site = (linear.layer_idx, part.name)
            if site in self.input_sites:  # input-scaled modules are never packed with others
                x = kernels.segmented_scaled(x, self.vectors[site], seg)
        return x

    def add_output(
        self, kernels: AdapterKernels, linear: AdapterLinear, x: torch.Tensor, y: torch.Tensor, seg: Segments
    ) -> None:
        for part in linear.parts:
            site = (linear.layer_idx, part.name)
            if site in self.vectors and site not in self.input_sites:
                kernels.segmented_scale(y[:, part.start : part.stop], self.vectors[site], seg)

"""KronA slots: per (layer, module, factor shapes) `W1 [S, o1, i1]` and `W2 [S, o2, i2]`; zeros where a slot's
adapter has no factors of that shape there (no contribution)."""

from __future__ import annotations

import torch

from switchboard.adapters_store.kinds import AdapterKind, KronaAdapter
from switchboard.kernels.backend import AdapterKernels
from switchboard.kernels.segments import Segments

from ...models.linear import AdapterLinear
from .base import AdditiveLayout, Site, Stacks

KronKey = tuple[int, str, tuple[int, int], tuple[int, int]]  # (layer, module, w1 shape, w2 shape)


class KronaLayout(AdditiveLayout):
    kind = AdapterKind.KRONA
    in_linears = True

    def __init__(self, stacks: Stacks) -> None:
        self.stacks = stacks
        self.factors: dict[KronKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self.by_site: dict[Site, list[KronKey]] = {}

    def register(self, adapter: KronaAdapter) -> None:
        for (layer, module), (w1, w2) in adapter.factors.items():
            key = (layer, module, tuple(w1.shape), tuple(w2.shape))
            if key not in self.factors:
                self.factors[key] = (self.stacks.zeros(*w1.shape), self.stacks.zeros(*w2.shape))
                self.by_site.setdefault((layer, module), []).append(key)

    def load(self, adapter: KronaAdapter, slot: int) -> None:
        dt, dev = self.stacks.dtype, self.stacks.device
        for (layer, module, s1, s2), (W1, W2) in self.factors.items():
            W1[slot].zero_()
            W2[slot].zero_()
            factors = adapter.factors.get((layer, module))
            if factors is not None and tuple(factors[0].shape) == s1 and tuple(factors[1].shape) == s2:
                W1[slot] = factors[0].to(dev, dt)
                W2[slot] = factors[1].to(dev, dt)

    def add_output(
        self, kernels: AdapterKernels, linear: AdapterLinear, x: torch.Tensor, y: torch.Tensor, seg: Segments
    ) -> None:
        for part in linear.parts:
            keys = self.by_site.get((linear.layer_idx, part.name))
            if keys:
                cols = y[:, part.start : part.stop]  # a view: the kernel adds in place
                for key in keys:
                    W1, W2 = self.factors[key]
                    kernels.kron_apply(cols, x, W1, W2, seg)

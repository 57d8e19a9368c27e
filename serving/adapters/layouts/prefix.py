"""Prefix adapters have no stacks: each resident prefix keeps its keys and values `[layers, 2, P, kv_heads,
head_dim]` on the device, written into a sequence's first cache positions when it is admitted (it then acts through
attention like any cached token, so the linears never see it)."""

from __future__ import annotations

import torch

from switchboard.adapters_store.kinds import AdapterKind, PrefixAdapter

from .base import Stacks


class PrefixLayout:
    kind = AdapterKind.PREFIX
    in_linears = False

    def __init__(self, stacks: Stacks) -> None:
        self.stacks = stacks
        self.kv: dict[str, torch.Tensor] = {}

    def register(self, adapter: PrefixAdapter) -> None:
        return None

    def load(self, adapter: PrefixAdapter, slot: int) -> None:
        self.kv[adapter.name] = adapter.kv.to(self.stacks.device, self.stacks.dtype)

    def drop(self, name: str) -> None:
        self.kv.pop(name, None)

    def write(self, name: str, cache: torch.Tensor, cache_slots: torch.Tensor) -> None:
        """Copy `name`'s virtual keys and values into the cache rows `cache_slots` (the cache may be float32)."""
        cache[:, :, cache_slots] = self.kv[name].to(cache.dtype)

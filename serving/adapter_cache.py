"""Device slots for adapters: stacked tensors the kernels index by slot, an LRU over slots, reference counts.

Each kind has its own pool of `max_resident` slots. Loading an adapter copies its (already scale-folded) tensors
into a free or least-recently-used unreferenced slot, so the forward pass never allocates:
- LoRA: per packed linear `A [S, parts * r_max, in]` (one shrink for q|k|v), per part `B [S, out, r_max]`,
  stored k-major; ranks below r_max are zero-padded, and a slot whose adapter does not touch a module holds
  zeros there (no contribution).
- KronA: per (layer, module, factor shapes) `W1 [S, o1, i1]`, `W2 [S, o2, i2]`; zeros where unused.
- (IA)3: per (layer, module) `V [S, n]` initialised to ones (the identity).
- prefix: no stacking; each resident prefix keeps its keys and values `[layers, 2, P, kv_heads, head_dim]`, written
  into a sequence's first cache positions when it is admitted.
Running sequences hold a reference to their slot; a referenced slot is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from switchboard.adapters_store.kinds import (
    Adapter,
    AdapterKind,
    IA3Adapter,
    KronaAdapter,
    LoraAdapter,
    PrefixAdapter,
)

from .models.linear import AdapterLinear, LinearPart

Site = tuple[int, str]  # (layer, module)
KronKey = tuple[int, str, tuple[int, int], tuple[int, int]]  # (layer, module, w1 shape, w2 shape)


@dataclass(slots=True)
class SlotPool:
    """LRU over one kind's slots, with reference counts from running sequences."""

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
                self.resident[name] = slot
                return slot, victim
        return None


class AdapterSlots:
    def __init__(
        self,
        adapters: dict[str, Adapter],
        linears: list[AdapterLinear],
        max_resident: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.adapters = adapters
        self.dtype, self.device = dtype, device
        self.pools = {kind: SlotPool(max_resident) for kind in AdapterKind}
        self.prefix_kv: dict[str, torch.Tensor] = {}
        self.num_loads = 0
        self.num_evictions = 0
        s = max_resident
        loras = [a for a in adapters.values() if isinstance(a, LoraAdapter)]
        r = self.lora_rank = max((a.rank for a in loras), default=0)
        # LoRA down-projections are stacked per packed linear (q|k|v, gate|up: one shrink for all its parts);
        # up-projections per part. k-major storage ([S, in, r] and [S, r, out] seen transposed): the decode
        # gather path then sums weight rows straight from the slots (kernels/sgmv.py), near a base linear's cost.
        self.lora_A: dict[AdapterLinear, torch.Tensor] = {}  # [S, parts * r, in]
        self.lora_parts: dict[AdapterLinear, list[tuple[LinearPart, int]]] = {}  # part, first row in A
        self.lora_B: dict[Site, torch.Tensor] = {}  # [S, out, r]
        for lin in linears:
            parts = [
                (part, j * r)
                for j, part in enumerate(lin.parts)
                if any((lin.layer_idx, part.name) in a.weights for a in loras)
            ]
            if not parts:
                continue
            width = len(lin.parts) * r
            self.lora_A[lin] = torch.zeros(s, lin.in_features, width, dtype=dtype, device=device).transpose(1, 2)
            self.lora_parts[lin] = parts
            for part, _ in parts:
                out = part.stop - part.start
                self.lora_B[(lin.layer_idx, part.name)] = torch.zeros(s, r, out, dtype=dtype, device=device).transpose(
                    1, 2
                )
        self.kron: dict[KronKey, tuple[torch.Tensor, torch.Tensor]] = {}
        for a in adapters.values():
            if isinstance(a, KronaAdapter):
                for (layer, module), (w1, w2) in a.factors.items():
                    key = (layer, module, tuple(w1.shape), tuple(w2.shape))
                    if key not in self.kron:
                        self.kron[key] = (
                            torch.zeros(s, *w1.shape, dtype=dtype, device=device),
                            torch.zeros(s, *w2.shape, dtype=dtype, device=device),
                        )
        self.kron_by_site: dict[Site, list[KronKey]] = {}
        for key in self.kron:
            self.kron_by_site.setdefault((key[0], key[1]), []).append(key)
        self.ia3: dict[Site, torch.Tensor] = {}
        for a in adapters.values():
            if isinstance(a, IA3Adapter):
                for site, (vec, _) in a.vectors.items():
                    self.ia3.setdefault(site, torch.ones(s, vec.numel(), dtype=dtype, device=device))
        self.ia3_input_sites = {
            site
            for a in adapters.values()
            if isinstance(a, IA3Adapter)
            for site, (_, side) in a.vectors.items()
            if side == "input"
        }

    # ---- residency ------------------------------------------------------------------------------------------
    def kind(self, name: str) -> AdapterKind:
        return self.adapters[name].kind

    def acquire(self, name: str) -> int | None:
        """Make `name` resident and take a reference; its slot, or None when every slot is held."""
        pool = self.pools[self.kind(name)]
        slot = pool.lookup(name)
        if slot is None:
            placed = pool.place(name)
            if placed is None:
                return None
            slot, evicted = placed
            if evicted is not None:
                self.num_evictions += 1
                self.prefix_kv.pop(evicted, None)
            self._load(self.adapters[name], slot)
        pool.refs[name] = pool.refs.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        pool = self.pools[self.kind(name)]
        pool.refs[name] -= 1

    def num_resident(self) -> int:
        return sum(len(p.resident) for p in self.pools.values())

    def _load(self, adapter: Adapter, slot: int) -> None:
        """Copy an adapter's tensors into `slot` of every stack of its kind (zeros/ones where it has none)."""
        self.num_loads += 1
        dt, dev = self.dtype, self.device
        if isinstance(adapter, LoraAdapter):
            for lin, A_stack in self.lora_A.items():
                A_stack[slot].zero_()
                for part, row in self.lora_parts[lin]:
                    site = (lin.layer_idx, part.name)
                    self.lora_B[site][slot].zero_()
                    if site in adapter.weights:
                        A, B = adapter.weights[site]
                        A_stack[slot, row : row + A.shape[0]] = A.to(dev, dt)
                        self.lora_B[site][slot, :, : B.shape[1]] = B.to(dev, dt)
        elif isinstance(adapter, KronaAdapter):
            for (layer, module, s1, s2), (W1, W2) in self.kron.items():
                W1[slot].zero_()
                W2[slot].zero_()
                factors = adapter.factors.get((layer, module))
                if factors is not None and tuple(factors[0].shape) == s1 and tuple(factors[1].shape) == s2:
                    W1[slot] = factors[0].to(dev, dt)
                    W2[slot] = factors[1].to(dev, dt)
        elif isinstance(adapter, IA3Adapter):
            for site, V in self.ia3.items():
                V[slot].fill_(1.0)
                if site in adapter.vectors:
                    V[slot] = adapter.vectors[site][0].to(dev, dt)
        elif isinstance(adapter, PrefixAdapter):
            self.prefix_kv[adapter.name] = adapter.kv.to(dev, dt)

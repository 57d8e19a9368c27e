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
Running sequences hold a reference to their slot; a referenced slot is never evicted. Adapters can be registered
while serving (uploads): stacks are allocated when the first adapter needing them arrives (see `register`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
from switchboard.kernels.sgmv import PackedLora, pack_lora

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


def _ignore(_: str) -> None:
    return None


class AdapterSlots:
    """Device slots of every kind. Adapters may be registered at any time between steps (uploads): the stacks an
    adapter needs (a linear, a KronA factor shape, an (IA)3 site no resident adapter touched before) are allocated the
    first time one is registered, and the LoRA stacks grow their rank to the largest registered (zero-padded)."""

    def __init__(
        self,
        adapters: dict[str, Adapter],
        linears: list[AdapterLinear],
        max_resident: int,
        dtype: torch.dtype,
        device: torch.device,
        code_lora_slots: bool = True,
    ) -> None:
        self.adapters: dict[str, Adapter] = {}
        self.code_lora_slots = code_lora_slots  # coded copies of bf16 LoRA slots for the CPU op (`pack_lora`)
        self.linears = linears
        self.max_resident = max_resident
        self.dtype, self.device = dtype, device
        self.pools = {kind: SlotPool(max_resident) for kind in AdapterKind}
        self.prefix_kv: dict[str, torch.Tensor] = {}
        self.num_loads = 0
        self.num_evictions = 0
        self.num_hits = 0
        self.on_evict: Callable[[str], None] = _ignore  # the engine drops an evicted adapter nobody waits for
        self.lora_rank = 0
        # LoRA down-projections are stacked per packed linear (q|k|v, gate|up: one shrink for all its parts);
        # up-projections per part. k-major storage ([S, in, r] and [S, r, out] seen transposed): the decode
        # gather path then sums weight rows straight from the slots (kernels/sgmv.py), near a base linear's cost.
        self.lora_A: dict[AdapterLinear, torch.Tensor] = {}  # [S, parts * r, in]
        self.lora_parts: dict[AdapterLinear, list[tuple[LinearPart, int]]] = {}  # part, first row in A
        self.lora_B: dict[Site, torch.Tensor] = {}  # [S, out, r]
        self.lora_packed: dict[AdapterLinear, PackedLora] = {}  # lora_A and its parts as the kernels take them
        self.kron: dict[KronKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kron_by_site: dict[Site, list[KronKey]] = {}
        self.ia3: dict[Site, torch.Tensor] = {}
        self.ia3_input_sites: set[Site] = set()
        for adapter in adapters.values():
            self.register(adapter)

    # ---- registration (between steps) -------------------------------------------------------------------------
    def register(self, adapter: Adapter) -> None:
        """Make `adapter` acquirable, allocating the stacks it needs that do not exist yet."""
        if isinstance(adapter, LoraAdapter):
            self._register_lora(adapter)
        elif isinstance(adapter, KronaAdapter):
            for (layer, module), (w1, w2) in adapter.factors.items():
                key = (layer, module, tuple(w1.shape), tuple(w2.shape))
                if key not in self.kron:
                    self.kron[key] = (self._zeros(*w1.shape), self._zeros(*w2.shape))
                    self.kron_by_site.setdefault((layer, module), []).append(key)
        elif isinstance(adapter, IA3Adapter):
            for site, (vec, side) in adapter.vectors.items():
                if site not in self.ia3:
                    self.ia3[site] = torch.ones(self.max_resident, vec.numel(), dtype=self.dtype, device=self.device)
                if side == "input":
                    self.ia3_input_sites.add(site)
        self.adapters[adapter.name] = adapter

    def forget(self, name: str) -> bool:
        """Drop an adapter nobody references from the slots and the registry; False if it is still referenced."""
        adapter = self.adapters.get(name)
        if adapter is None:
            return True
        pool = self.pools[adapter.kind]
        if pool.refs.get(name, 0):
            return False
        pool.resident.pop(name, None)
        pool.refs.pop(name, None)
        self.prefix_kv.pop(name, None)
        del self.adapters[name]
        return True

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(self.max_resident, *shape, dtype=self.dtype, device=self.device)

    def _register_lora(self, adapter: LoraAdapter) -> None:
        changed = adapter.rank > self.lora_rank
        if changed:
            self._grow_lora_rank(adapter.rank)
        r = self.lora_rank
        for lin in self.linears:
            for j, part in enumerate(lin.parts):
                site = (lin.layer_idx, part.name)
                if site not in adapter.weights or site in self.lora_B:
                    continue
                if lin not in self.lora_A:
                    self.lora_A[lin] = self._zeros(lin.in_features, len(lin.parts) * r).transpose(1, 2)
                    self.lora_parts[lin] = []
                self.lora_parts[lin].append((part, j * r))
                self.lora_parts[lin].sort(key=lambda pr: pr[1])
                self.lora_B[site] = self._zeros(r, part.stop - part.start).transpose(1, 2)
                changed = True
        if changed:
            self._pack_lora()

    def _pack_lora(self) -> None:
        """Re-derive each linear's `PackedLora` (new stacks, a new rank); cheap, and only on registration."""
        self.lora_packed = {
            lin: pack_lora(
                A,
                [(self.lora_B[(lin.layer_idx, p.name)], p.start, row) for p, row in self.lora_parts[lin]],
                code_slots=self.code_lora_slots,
            )
            for lin, A in self.lora_A.items()
        }

    def _grow_lora_rank(self, r: int) -> None:
        """Re-lay every LoRA stack at rank `r` (part j's rows move from j * old to j * r; new rows are zero)."""
        old = self.lora_rank
        for lin, A_old in self.lora_A.items():
            A = self._zeros(lin.in_features, len(lin.parts) * r).transpose(1, 2)
            for j in range(len(lin.parts)):
                A[:, j * r : j * r + old] = A_old[:, j * old : (j + 1) * old]
            self.lora_A[lin] = A
            self.lora_parts[lin] = [(part, row // old * r) for part, row in self.lora_parts[lin]]
        for site, B_old in self.lora_B.items():
            B = self._zeros(r, B_old.shape[1]).transpose(1, 2)
            B[:, :, :old] = B_old
            self.lora_B[site] = B
        self.lora_rank = r

    # ---- residency ------------------------------------------------------------------------------------------
    def kind(self, name: str) -> AdapterKind:
        return self.adapters[name].kind

    def acquire(self, name: str) -> int | None:
        """Make `name` resident and take a reference; its slot, or None when every slot is held. Raises what loading
        raised, leaving `name` not resident."""
        pool = self.pools[self.kind(name)]
        slot = pool.lookup(name)
        if slot is not None:
            self.num_hits += 1
        else:
            placed = pool.place(name)
            if placed is None:
                return None
            slot, evicted = placed
            if evicted is not None:
                self.num_evictions += 1
                self.prefix_kv.pop(evicted, None)
                self.on_evict(evicted)
            try:
                self._load(self.adapters[name], slot)
            except BaseException:  # a half-loaded slot must not be found resident by the next request
                pool.resident.pop(name, None)
                self.prefix_kv.pop(name, None)
                raise
        pool.refs[name] = pool.refs.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        pool = self.pools[self.kind(name)]
        pool.refs[name] -= 1

    def is_resident(self, name: str) -> bool:
        return name in self.pools[self.kind(name)].resident

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
            for packed in self.lora_packed.values():
                packed.recode(slot)
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

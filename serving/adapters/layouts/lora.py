"""LoRA slots: per packed linear `A [S, parts * r_max, in]` (one shrink for q|k|v), per part `B [S, out, r_max]`.

Stored k-major (`[S, in, r]` and `[S, r, out]` seen transposed): the decode gather path then sums weight rows straight
from the slots (kernels/sgmv.py), near a base linear's cost. Ranks below r_max are zero-padded, and a slot whose
adapter does not touch a module holds zeros there (no contribution). The stacks grow their rank to the largest
registered adapter's.
"""

from __future__ import annotations

import torch

from switchboard.adapters_store.kinds import AdapterKind, LoraAdapter
from switchboard.kernels.backend import AdapterKernels
from switchboard.kernels.segments import Segments
from switchboard.kernels.sgmv import PackedLora, pack_lora

from ...models.linear import AdapterLinear, LinearPart
from .base import AdditiveLayout, Site, Stacks


class LoraLayout(AdditiveLayout):
    kind = AdapterKind.LORA
    in_linears = True

    def __init__(self, stacks: Stacks, linears: list[AdapterLinear], code_slots: bool = True) -> None:
        self.stacks, self.linears = stacks, linears
        self.code_slots = code_slots  # coded copies of bf16 slots for the compiled CPU op (`pack_lora`)
        self.rank = 0
        self.A: dict[AdapterLinear, torch.Tensor] = {}  # [S, parts * r, in]
        self.parts: dict[AdapterLinear, list[tuple[LinearPart, int]]] = {}  # part, first row in A
        self.B: dict[Site, torch.Tensor] = {}  # [S, out, r]
        self.packed: dict[AdapterLinear, PackedLora] = {}  # A and its parts as the kernels take them

    def register(self, adapter: LoraAdapter) -> None:
        changed = adapter.rank > self.rank
        if changed:
            self._grow_rank(adapter.rank)
        r = self.rank
        for lin in self.linears:
            for j, part in enumerate(lin.parts):
                site = (lin.layer_idx, part.name)
                if site not in adapter.weights or site in self.B:
                    continue
                if lin not in self.A:
                    self.A[lin] = self.stacks.zeros(lin.in_features, len(lin.parts) * r).transpose(1, 2)
                    self.parts[lin] = []
                self.parts[lin].append((part, j * r))
                self.parts[lin].sort(key=lambda pr: pr[1])
                self.B[site] = self.stacks.zeros(r, part.stop - part.start).transpose(1, 2)
                changed = True
        if changed:
            self._pack()

    def load(self, adapter: LoraAdapter, slot: int) -> None:
        dt, dev = self.stacks.dtype, self.stacks.device
        for lin, A_stack in self.A.items():
            A_stack[slot].zero_()
            for part, row in self.parts[lin]:
                site = (lin.layer_idx, part.name)
                self.B[site][slot].zero_()
                if site in adapter.weights:
                    A, B = adapter.weights[site]
                    A_stack[slot, row : row + A.shape[0]] = A.to(dev, dt)
                    self.B[site][slot, :, : B.shape[1]] = B.to(dev, dt)
        for packed in self.packed.values():
            packed.recode(slot)

    def add_output(
        self, kernels: AdapterKernels, linear: AdapterLinear, x: torch.Tensor, y: torch.Tensor, seg: Segments
    ) -> None:
        if (packed := self.packed.get(linear)) is not None:
            kernels.lora_packed(y, x, packed, seg)  # one shrink for q|k|v, then each expand

    def _pack(self) -> None:
        """Re-derive each linear's `PackedLora` (new stacks, a new rank); cheap, and only on registration."""
        self.packed = {
            lin: pack_lora(
                A,
                [(self.B[(lin.layer_idx, p.name)], p.start, row) for p, row in self.parts[lin]],
                code_slots=self.code_slots,
            )
            for lin, A in self.A.items()
        }

    def _grow_rank(self, r: int) -> None:
        """Re-lay every stack at rank `r` (part j's rows move from j * old to j * r; new rows are zero)."""
        old = self.rank
        for lin, A_old in self.A.items():
            A = self.stacks.zeros(lin.in_features, len(lin.parts) * r).transpose(1, 2)
            for j in range(len(lin.parts)):
                A[:, j * r : j * r + old] = A_old[:, j * old : (j + 1) * old]
            self.A[lin] = A
            self.parts[lin] = [(part, row // old * r) for part, row in self.parts[lin]]
        for site, B_old in self.B.items():
            B = self.stacks.zeros(r, B_old.shape[1]).transpose(1, 2)
            B[:, :, :old] = B_old
            self.B[site] = B
        self.rank = r

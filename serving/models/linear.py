"""The adapter-aware linear: every projection of the model is one, so adapters slot in without patching.

`y = x W^T + b`, then whatever per-step adapter work the batch carries (`LinearDeltas`): an input transform
((IA)3 on feed-forward targets scales the input of down_proj) and an output update (LoRA and KronA add a
low-rank or Kronecker delta; (IA)3 on k/v scales the output). Projections that read the same input are packed
into one weight (q|k|v, gate|up) so that the base GEMM runs once; each packed part keeps its Hugging Face name, and
adapters address parts by `(layer, name)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class LinearPart:
    """One Hugging Face projection inside a packed weight: output rows [start, stop)."""

    name: str  # "q_proj", "k_proj", ..., "down_proj"
    start: int
    stop: int


class LinearDeltas(Protocol):
    """Adapter work for one step's batch, built once per step and passed explicitly to every linear."""

    def transform_input(self, linear: AdapterLinear, x: torch.Tensor) -> torch.Tensor: ...

    def add_output(self, linear: AdapterLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class AdapterLinear(nn.Module):
    """A frozen base linear over packed parts, plus the batch's adapter deltas."""

    def __init__(self, layer_idx: int, in_features: int, parts: dict[str, int], bias: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.in_features = in_features
        offsets, start = [], 0
        for name, size in parts.items():
            offsets.append(LinearPart(name, start, start + size))
            start += size
        self.parts: tuple[LinearPart, ...] = tuple(offsets)
        self.out_features = start
        self.weight = nn.Parameter(torch.empty(start, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(start), requires_grad=False) if bias else None
        # The frozen base product `base_matmul(x, weight, bias)`: F.linear over the dense weight, or, after
        # quant.quantize_nf4, an NF4Linear (then `weight` is None); chosen once, never branched on in forward.
        self.base_matmul: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor] = F.linear

    def part(self, name: str) -> LinearPart:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"layer {self.layer_idx} has no projection {name!r}")

    def forward(self, x: torch.Tensor, deltas: LinearDeltas | None = None) -> torch.Tensor:
        # x: [T, in_features] -> [T, out_features]
        if deltas is None:
            return self.base_matmul(x, self.weight, self.bias)
        x_in = deltas.transform_input(self, x)
        return deltas.add_output(self, x, self.base_matmul(x_in, self.weight, self.bias))

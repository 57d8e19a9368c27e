"""One step's adapter work for every linear of the model (`LinearDeltas`), built once per step.

Each token carries at most one adapter, so per kind a token has a slot or -1. The step's segments per kind are
built once here and shared by every layer; each linear then runs, per packed part it holds, the segmented kernels
of the kinds present: LoRA shrink/expand, the Kronecker-vector product, (IA)3 scaling of the output (k, v, ...)
or of the input (feed-forward targets such as down_proj).
"""

from __future__ import annotations

import torch

from switchboard.adapters_store.kinds import AdapterKind
from switchboard.kernels.backend import AdapterKernels
from switchboard.kernels.segments import Segments, build_segments

from ..adapter_cache import AdapterSlots
from ..models.linear import AdapterLinear


class AdapterBatch:
    def __init__(
        self,
        slots: AdapterSlots,
        kernels: AdapterKernels,
        token_slots: dict[AdapterKind, list[int]],
        device: torch.device,
    ) -> None:
        self.slots = slots
        self.k = kernels
        # Segments only for kinds some token of this step uses.
        self.seg: dict[AdapterKind, Segments] = {
            kind: build_segments(ts, device) for kind, ts in token_slots.items() if any(s >= 0 for s in ts)
        }
        # Looked up once here: every linear of the step asks.
        self.lora = self.seg.get(AdapterKind.LORA)
        self.krona = self.seg.get(AdapterKind.KRONA)
        self.ia3 = self.seg.get(AdapterKind.IA3)

    def transform_input(self, linear: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
        if self.ia3 is None:
            return x
        for part in linear.parts:
            site = (linear.layer_idx, part.name)
            if site in self.slots.ia3_input_sites:  # input-scaled modules are never packed with others
                x = self.k.segmented_scaled(x, self.slots.ia3[site], self.ia3)
        return x

    def add_output(self, linear: AdapterLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.slots
        if self.lora is not None and (packed := s.lora_packed.get(linear)) is not None:
            self.k.lora_packed(y, x, packed, self.lora)  # one shrink for q|k|v, then each expand
        if self.krona is None and self.ia3 is None:  # the common case ends here: no per-part views to make
            return y
        for part in linear.parts:
            site = (linear.layer_idx, part.name)
            cols = y[:, part.start : part.stop]  # a view: kernels add or scale in place
            if self.krona is not None:
                for key in s.kron_by_site.get(site, ()):
                    W1, W2 = s.kron[key]
                    self.k.kron_apply(cols, x, W1, W2, self.krona)
            if self.ia3 is not None and site in s.ia3 and site not in s.ia3_input_sites:
                self.k.segmented_scale(cols, s.ia3[site], self.ia3)
        return y

"""`--merge-adapter`: fold one LoRA, KronA or (IA)3 adapter into the base weights, so it costs nothing per token;
the engine then serves that adapter only (and the base model not at all)."""

from __future__ import annotations

import torch

from switchboard.adapters_store.kinds import Adapter, AdapterKind

from ..models.linear import AdapterLinear


def merge_into(linears: list[AdapterLinear], adapter: Adapter) -> None:
    if adapter.kind is AdapterKind.PREFIX:
        raise ValueError(f"--merge-adapter {adapter.name!r}: a prefix adapter cannot be merged into weights")
    parts = {(lin.layer_idx, part.name): (lin, part) for lin in linears for part in lin.parts}
    with torch.no_grad():
        for layer, module in adapter.modules():
            lin, part = parts[(layer, module)]
            rows = lin.weight.data[part.start : part.stop]
            rows.copy_(adapter.merge(rows.clone(), layer, module))
            if lin.bias is not None:
                b = lin.bias.data[part.start : part.stop]
                b.copy_(adapter.merge_bias(b.clone(), layer, module))

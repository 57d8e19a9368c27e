"""Seeded synthetic PEFT LoRA adapters, written straight with safetensors (fast enough for a thousand): what the
tests, the benchmarks and the load tester upload when they need many adapters and no training.

The values are random normal, A scaled by `a_scale` (default 1/sqrt(in_features)) and B by `b_scale`; the tensors
are drawn layer by layer, module by module, A before B, so a seed names the same adapter everywhere.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save

from switchboard.adapters_store.kinds.base import ATTENTION, CONFIG_FILE, TARGET_MODULES, WEIGHTS_FILE, BaseModelShape

Files = dict[str, bytes]  # file name -> bytes, as an upload sends them


def lora_tensors(
    base: BaseModelShape,
    *,
    rank: int,
    modules: tuple[str, ...] = ATTENTION,
    seed: int = 0,
    a_scale: float | None = None,
    b_scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """PEFT's tensor names -> seeded lora_A [r, in] and lora_B [out, r] for `modules` of every layer."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base.num_layers):
        for module in modules:
            out, inp = base.module_shape(module)
            key = f"base_model.model.model.layers.{layer}.{TARGET_MODULES[module]}.{module}"
            a = torch.randn(rank, inp, generator=g) * (inp**-0.5 if a_scale is None else a_scale)
            tensors[f"{key}.lora_A.weight"] = a.to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * b_scale).to(dtype)
    return tensors


def lora_config(rank: int, modules: tuple[str, ...] = ATTENTION, alpha: float | None = None, **extra: object) -> dict:
    """A PEFT LoRA adapter_config.json (alpha 2 x rank unless given)."""
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank if alpha is None else alpha,
        "target_modules": list(modules),
        **extra,
    }


def lora_files(
    base: BaseModelShape,
    *,
    rank: int,
    modules: tuple[str, ...] = ATTENTION,
    seed: int = 0,
    alpha: float | None = None,
    a_scale: float | None = None,
    b_scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> Files:
    """The two files of a seeded LoRA adapter, as bytes."""
    tensors = lora_tensors(base, rank=rank, modules=modules, seed=seed, a_scale=a_scale, b_scale=b_scale, dtype=dtype)
    return {CONFIG_FILE: json.dumps(lora_config(rank, modules, alpha)).encode(), WEIGHTS_FILE: save(tensors)}

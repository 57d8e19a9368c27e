"""LoRA (PEFT `peft_type: LORA`): `W' = W + s * B @ A` per target projection.

PEFT directory semantics (peft 0.21 `tuners/lora`):
- tensors `...{module}.lora_A.weight` [r, in] and `...{module}.lora_B.weight` [out, r];
- `s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `r` and `lora_alpha` per module come from
  `rank_pattern` / `alpha_pattern` (first regex `p` with `re.match(rf"(.*\\.)?({p})$", "model.layers.{i}.self_attn.
  q_proj")`, matched in linear time by `patterns.ConfigPatterns`), else from `r` / `lora_alpha`;
- `get_delta_weight` = `(B @ A) * s` (no transpose for nn.Linear).
We fold `s` into B once at load: `weights[(layer, module)] = (A [r, in], s * B [out, r])`, float32 on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from switchboard.adapters_store.kinds.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterKind,
    BaseModelShape,
    check_served,
    check_shape,
    config_bool,
    config_int,
    config_number,
    group_keys,
    matrix_shape,
    merge_additive,
    module_key,
    open_weights,
    refuse_options,
)
from switchboard.adapters_store.kinds.patterns import ConfigPatterns
from switchboard.adapters_store.kinds.targets import check_targets

LEAVES = ("lora_A.weight", "lora_B.weight")
REFUSED_TENSORS = {
    "lora_magnitude_vector": "DoRA (use_dora) is not supported",
    "lora_B.bias": "lora_bias is not supported",
}
REFUSED_OPTIONS = {
    "lora_bias": "the adapter trains a bias on lora_B",
    "fan_in_fan_out": "it is for Conv1D (GPT-2 style) weights; Llama-family projections are nn.Linear",
    "layer_replication": "it changes the base model's stack of layers",
    "modules_to_save": "it stores full copies of base-model modules",
    "trainable_token_indices": "it trains rows of the embedding matrix",
    "target_parameters": "it targets bare nn.Parameters rather than projections",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens and cannot merge",
    "use_qalora": "QA-LoRA pools the input of the adapter",
    "velora_config": "LoRA variant VeLoRA is not supported",
    "monteclora_config": "LoRA variant MonteCLoRA is not supported",
    "use_bdlora": "LoRA variant BD-LoRA is not supported",
    "arrow_config": "LoRA variant Arrow routes between experts per token",
    "kasa_config": "LoRA variant KaSA is not supported",
}
# init_lora_weights values whose initialisation rewrote the base weights (W - s B0 A0, or a quantized residual):
# such an adapter is only correct on that modified base, which we do not have.
BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@dataclass(frozen=True, slots=True, eq=False)
class LoraAdapter:
    name: str
    path: Path
    base: BaseModelShape
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (A [r, in], s*B [out, r])
    num_parameters: int
    rank: int  # the largest r over modules
    kind: AdapterKind = field(default=AdapterKind.LORA, init=False)
    merge_exact: bool = field(default=True, init=False)

    @classmethod
    def load(cls, path: Path, config: dict[str, Any], base: BaseModelShape, name: str) -> LoraAdapter:
        check_config(config)
        use_rslora = config_bool(config, "use_rslora")
        default_r = config_int(config, "r", default=8)
        default_alpha = config_number(config, "lora_alpha", default=8)
        patterns = ConfigPatterns(config)
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        with open_weights(path / WEIGHTS_FILE) as file:
            groups = group_keys(file, base, LEAVES, REFUSED_TENSORS)
            check_targets(patterns, set(groups), base)
            ranks: dict[tuple[int, str], int] = {}
            for (layer, module), keys in groups.items():  # validate every header entry before loading anything
                missing = [leaf for leaf in LEAVES if leaf not in keys]
                if missing:
                    present = next(iter(keys.values()))
                    raise file.error(f"{present!r} has no matching {missing[0]} (a LoRA needs both halves)")
                a_key, b_key = keys["lora_A.weight"], keys["lora_B.weight"]
                out_features, in_features = base.module_shape(module)
                rank = matrix_shape(file, a_key)[0]
                check_shape(file, a_key, (rank, in_features))
                check_shape(file, b_key, (out_features, rank))
                expected = patterns.value("rank_pattern", module_key(layer, module), default_r)
                if rank != expected:
                    raise file.error(f"{a_key!r} has rank {rank}, but {CONFIG_FILE} gives r={expected!r}")
                ranks[(layer, module)] = rank
            for (layer, module), keys in groups.items():
                rank = ranks[(layer, module)]
                alpha = patterns.number("alpha_pattern", module_key(layer, module), default_alpha)
                scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
                a = check_served(file.tensor(keys["lora_A.weight"]), f"tensor {keys['lora_A.weight']!r}")
                b_key = keys["lora_B.weight"]
                b = check_served(file.tensor(b_key) * scale, f"tensor {b_key!r} times the scale {scale:.4g}")
                weights[(layer, module)] = (a, b)
        return cls(
            name=name,
            path=path,
            base=base,
            weights=weights,
            num_parameters=sum(a.numel() + b.numel() for a, b in weights.values()),
            rank=max(ranks.values()),
        )

    def modules(self) -> list[tuple[int, str]]:
        return sorted(self.weights)

    def delta(self, layer: int, module: str) -> torch.Tensor:
        """`s * B @ A` [out, in], float32; zeros for a module the adapter does not touch."""
        if (layer, module) not in self.weights:
            return torch.zeros(self.base.module_shape(module))
        a, b = self.weights[(layer, module)]
        return b @ a

    def probe(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.weights[(layer, module)]
        return b @ (a @ x)

    def merge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """`weight + s B A` in float32, cast back; an untouched module's weight is returned as is."""
        return merge_additive(self, weight, layer, module, 1.0)

    def unmerge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        return merge_additive(self, weight, layer, module, -1.0)

    def merge_bias(self, bias: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        return bias  # an additive delta of the weight leaves the bias as it is


def check_config(config: dict[str, Any]) -> None:
    """Refuse LoRA options whose semantics differ from plain `W + s B A` on the unmodified base."""
    if config_bool(config, "use_dora"):
        raise AdapterError("DoRA (use_dora) is not supported", CONFIG_FILE)
    refuse_options(config, REFUSED_OPTIONS)
    if config.get("bias", "none") not in (None, "none"):
        raise AdapterError(f"bias={config['bias']!r} is not supported: it saves trained base-model biases", CONFIG_FILE)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r} is not supported: that initialisation rewrote the base weights, so the "
            "adapter only fits that modified base (save it with path_initial_model_for_weight_conversion to get a "
            "plain LoRA)",
            CONFIG_FILE,
        )

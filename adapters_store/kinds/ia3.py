"""(IA)3 (PEFT `peft_type: IA3`): a learned vector scales a projection's output or its input.

PEFT directory semantics (peft 0.21 `tuners/ia3/layer.py`):
- one tensor `...{module}.ia3_l` per target: [out, 1] for output-scaled targets (`y = (x W^T) * l`), [1, in] for
  feed-forward targets (`y = (x * l) W^T`);
- a target is feed-forward when `feedforward_modules` (a list: `module_key.endswith(item)`; a string:
  `re.fullmatch(it, module_key)`, matched in linear time by `patterns.ConfigPatterns`) matches its name
  `model.layers.{i}.mlp.down_proj`;
- merge is `W * ia3_l` with broadcasting: rows of W (and the bias) for output scaling, columns for input scaling;
  PEFT's unmerge divides by `ia3_l + 1e-8` and warns it is inexact. Our unmerge divides exactly and refuses a
  vector with a zero component.
`vectors[(layer, module)] = (l 1-D float32, "output" | "input")`. Without `feedforward_modules` in the config the
stored shape decides; with it, the shape must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from switchboard.adapters_store.kinds.base import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterKind,
    BaseModelShape,
    check_served,
    group_keys,
    module_key,
    open_weights,
    refuse_options,
)
from switchboard.adapters_store.kinds.patterns import ConfigPatterns
from switchboard.adapters_store.kinds.targets import check_targets

Side = Literal["input", "output"]
LEAVES = ("ia3_l",)
REFUSED_OPTIONS = {
    "fan_in_fan_out": "it is for Conv1D (GPT-2 style) weights; Llama-family projections are nn.Linear",
    "modules_to_save": "it stores full copies of base-model modules",
}


@dataclass(frozen=True, slots=True, eq=False)
class IA3Adapter:
    name: str
    path: Path
    base: BaseModelShape
    vectors: dict[tuple[int, str], tuple[torch.Tensor, Side]]  # (l [out] or [in], which side it scales)
    num_parameters: int
    rank: int = field(default=0, init=False)
    kind: AdapterKind = field(default=AdapterKind.IA3, init=False)
    merge_exact: bool = field(default=False, init=False)

    @classmethod
    def load(cls, path: Path, config: dict[str, Any], base: BaseModelShape, name: str) -> IA3Adapter:
        refuse_options(config, REFUSED_OPTIONS)
        patterns = ConfigPatterns(config)
        patterns.names_or_regex("feedforward_modules")
        vectors: dict[tuple[int, str], tuple[torch.Tensor, Side]] = {}
        with open_weights(path / WEIGHTS_FILE) as file:
            sides: dict[tuple[int, str], tuple[str, Side]] = {}
            groups = group_keys(file, base, LEAVES)
            check_targets(patterns, set(groups), base)
            for (layer, module), keys in groups.items():
                key = keys["ia3_l"]
                out_features, in_features = base.module_shape(module)
                shapes: dict[Side, tuple[int, ...]] = {"output": (out_features, 1), "input": (1, in_features)}
                side = feedforward_side(patterns, module_key(layer, module))
                stored = file.shapes[key]
                if side is None:  # no feedforward_modules in the config: the stored shape decides
                    side = next((s for s, shape in shapes.items() if stored == shape), None)
                    if side is None:
                        raise file.error(
                            f"tensor {key!r} has shape {list(stored)}, expected {list(shapes['output'])} "
                            f"(output scaling) or {list(shapes['input'])} (input scaling)"
                        )
                elif stored != shapes[side]:
                    raise file.error(
                        f"tensor {key!r} has shape {list(stored)}, expected {list(shapes[side])} "
                        f"({side} scaling per feedforward_modules)"
                    )
                sides[(layer, module)] = (key, side)
            for (layer, module), (key, side) in sides.items():
                vectors[(layer, module)] = (check_served(file.tensor(key).reshape(-1), f"tensor {key!r}"), side)
        return cls(
            name=name,
            path=path,
            base=base,
            vectors=vectors,
            num_parameters=sum(v.numel() for v, _ in vectors.values()),
        )

    def modules(self) -> list[tuple[int, str]]:
        return sorted(self.vectors)

    def delta(self, layer: int, module: str) -> torch.Tensor:
        raise AdapterError(f"{self.name}: (IA)3 scales weights; it has no additive delta (use merge)")

    def probe(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        vector, side = self.vectors[(layer, module)]
        return x * vector if side == "input" else vector

    def merge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """Rows (output) or columns (input) of `weight` times l, in float32, cast back; untouched: as is."""
        if (layer, module) not in self.vectors:
            return weight
        return weight.to(torch.float32).mul(self._broadcast(weight, layer, module)).to(weight.dtype)

    def unmerge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """Divide by l; refused when a component of l is 0 (that row or column of the base is lost)."""
        if (layer, module) not in self.vectors:
            return weight
        scale = self._broadcast(weight, layer, module)
        if (scale == 0).any():
            raise AdapterError(f"{self.name}: cannot unmerge layer {layer} {module}: ia3_l has a zero component")
        return weight.to(torch.float32).div(scale).to(weight.dtype)

    def merge_bias(self, bias: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """The bias after merging (Qwen2 q/k/v): output scaling scales it too, input scaling leaves it."""
        if (layer, module) not in self.vectors or self.vectors[(layer, module)][1] == "input":
            return bias
        return bias.to(torch.float32).mul(self.vectors[(layer, module)][0].to(bias.device)).to(bias.dtype)

    def _broadcast(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        vector, side = self.vectors[(layer, module)]
        expected = self.base.module_shape(module)
        if tuple(weight.shape) != expected:
            raise AdapterError(
                f"{self.name} layer {layer} {module}: weight has shape {list(weight.shape)}, expected {list(expected)}"
            )
        vector = vector.to(weight.device)
        return vector[:, None] if side == "output" else vector[None, :]


def feedforward_side(patterns: ConfigPatterns, key: str) -> Side | None:
    """PEFT's `IA3Model._check_target_module_feedforward`, or None when the config does not say."""
    feedforward = patterns.names_or_regex("feedforward_modules")
    if feedforward is None:
        return None
    if isinstance(feedforward, str):
        is_feedforward = patterns.fullmatch("feedforward_modules", key)
    else:
        is_feedforward = any(key.endswith(item) for item in feedforward)
    return "input" if is_feedforward else "output"

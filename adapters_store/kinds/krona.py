"""KronA (PEFT `peft_type: LOKR`): `W' = W + s * kron(w1, w2)` per target projection.

PEFT directory semantics (peft 0.21 `tuners/lokr/layer.py`, `update_layer` and `get_delta_weight`):
- `w1` [o1, i1] is stored whole as `lokr_w1`, or as `lokr_w1_a` [o1, r] @ `lokr_w1_b` [r, i1] (only with
  `decompose_both` and `r < max(o1, i1) / 2`); `w2` [o2, i2] likewise as `lokr_w2`, or `lokr_w2_a` [o2, r] @
  `lokr_w2_b` [r, i2] whenever `r < max(o2, i2) / 2`. PEFT picks (o1, o2) = factorization(out, decompose_factor)
  and (i1, i2) = factorization(in, ...), so out = o1 * o2 and in = i1 * i2; we accept any such split.
- delta = `torch.kron(w1, w2) * alpha / r` in nn.Linear layout [out, in]; `r` and `alpha` per module come from
  `rank_pattern` / `alpha_pattern` (same regex rule as LoRA), else `r` / `alpha`. No rsLoRA for LoKr.
- `lokr_t2` (Tucker core, `use_effective_conv2d`) exists only for convolutions: refused.
- `rank_dropout`, `module_dropout` act only in training (`get_delta_weight(apply_rank_dropout=False)` at inference).
We multiply out decomposed factors and fold `s` into w1 once at load: `factors[(layer, module)] = (s * w1, w2)`.
`rank` is the largest bound rank(w1) * rank(w2) <= min(o1, i1[, r]) * min(o2, i2[, r]) over modules: the rank a
LoRA needs to express the delta exactly.
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
    WeightsFile,
    check_served,
    check_shape,
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

LEAVES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
REFUSED_TENSORS = {"lokr_t2": "the Tucker core lokr_t2 (use_effective_conv2d) is for convolutions only"}
REFUSED_OPTIONS = {"modules_to_save": "it stores full copies of base-model modules"}


@dataclass(frozen=True, slots=True)
class FactorLayout:
    """How one Kronecker factor is stored: whole ([o, i]) or as a product a [o, r] @ b [r, i]."""

    keys: tuple[str, ...]  # (whole,) or (a, b)
    rows: int
    cols: int
    rank_bound: int

    @property
    def name(self) -> str:
        """The factor as an error message names it: `tensor 'w'` or `tensor 'a' @ tensor 'b'`."""
        return " @ ".join(f"tensor {key!r}" for key in self.keys)


@dataclass(frozen=True, slots=True, eq=False)
class KronaAdapter:
    name: str
    path: Path
    base: BaseModelShape
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (s * w1 [o1, i1], w2 [o2, i2])
    num_parameters: int
    rank: int  # the largest bound on rank(delta) over modules
    kind: AdapterKind = field(default=AdapterKind.KRONA, init=False)
    merge_exact: bool = field(default=True, init=False)

    @classmethod
    def load(cls, path: Path, config: dict[str, Any], base: BaseModelShape, name: str) -> KronaAdapter:
        refuse_options(config, REFUSED_OPTIONS)
        default_r = config_int(config, "r", default=8)
        default_alpha = config_number(config, "alpha", default=8)
        patterns = ConfigPatterns(config)
        factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        num_parameters, rank = 0, 0
        with open_weights(path / WEIGHTS_FILE) as file:
            groups = group_keys(file, base, LEAVES, REFUSED_TENSORS)
            check_targets(patterns, set(groups), base)
            layouts: dict[tuple[int, str], tuple[FactorLayout, FactorLayout, int]] = {}
            for (layer, module), keys in groups.items():  # validate every header entry before loading anything
                r = patterns.value("rank_pattern", module_key(layer, module), default_r)
                if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                    raise AdapterError(f"rank for {module_key(layer, module)} is {r!r}", CONFIG_FILE)
                w1 = factor_layout(file, keys, "lokr_w1", r)
                w2 = factor_layout(file, keys, "lokr_w2", r)
                out_features, in_features = base.module_shape(module)
                if (w1.rows * w2.rows, w1.cols * w2.cols) != (out_features, in_features):
                    raise file.error(
                        f"layer {layer} {module}: kron of w1 [{w1.rows}, {w1.cols}] and w2 [{w2.rows}, {w2.cols}] "
                        f"is [{w1.rows * w2.rows}, {w1.cols * w2.cols}], expected [{out_features}, {in_features}]"
                    )
                layouts[(layer, module)] = (w1, w2, r)
                rank = max(rank, min(w1.rank_bound * w2.rank_bound, out_features, in_features))
            for (layer, module), (w1_layout, w2_layout, r) in layouts.items():
                alpha = patterns.number("alpha_pattern", module_key(layer, module), default_alpha)
                scale = alpha / r
                w1 = check_served(load_factor(file, w1_layout) * scale, f"{w1_layout.name} times the scale {scale:.4g}")
                w2 = check_served(load_factor(file, w2_layout), w2_layout.name)
                factors[(layer, module)] = (w1, w2)
                num_parameters += sum(math.prod(file.shapes[k]) for k in (*w1_layout.keys, *w2_layout.keys))
        return cls(name=name, path=path, base=base, factors=factors, num_parameters=num_parameters, rank=rank)

    def modules(self) -> list[tuple[int, str]]:
        return sorted(self.factors)

    def delta(self, layer: int, module: str) -> torch.Tensor:
        """`s * kron(w1, w2)` [out, in], float32; zeros for a module the adapter does not touch."""
        if (layer, module) not in self.factors:
            return torch.zeros(self.base.module_shape(module))
        w1, w2 = self.factors[(layer, module)]
        return torch.kron(w1, w2)

    def probe(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        """`kron(w1, w2) @ x` as `w1 @ X @ w2^T` with X = x viewed as [i1, i2], never materialising the kron."""
        w1, w2 = self.factors[(layer, module)]
        return (w1 @ x.view(w1.shape[1], w2.shape[1]) @ w2.T).reshape(-1)

    def merge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """`weight + s kron(w1, w2)` in float32, cast back; an untouched module's weight is returned as is."""
        return merge_additive(self, weight, layer, module, 1.0)

    def unmerge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        return merge_additive(self, weight, layer, module, -1.0)

    def merge_bias(self, bias: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        return bias  # an additive delta of the weight leaves the bias as it is


def factor_layout(file: WeightsFile, keys: dict[str, str], factor: str, r: int) -> FactorLayout:
    """Check how `factor` ("lokr_w1" or "lokr_w2") of one module is stored, from the header only."""
    whole, a, b = keys.get(factor), keys.get(f"{factor}_a"), keys.get(f"{factor}_b")
    some_key = next(iter(keys.values()))
    if whole is not None and (a is not None or b is not None):
        raise file.error(f"{whole!r} is stored both whole and as {factor}_a/{factor}_b")
    if whole is not None:
        rows, cols = matrix_shape(file, whole)
        return FactorLayout((whole,), rows, cols, min(rows, cols))
    if a is None or b is None:
        missing = f"{factor}_b" if a is not None else f"{factor}_a" if b is not None else factor
        raise file.error(f"{(a or b or some_key)!r} has no matching {missing}")
    rows, a_rank = matrix_shape(file, a)
    cols = matrix_shape(file, b)[1]
    if a_rank != r:
        raise file.error(f"{a!r} has rank {a_rank}, but {CONFIG_FILE} gives r={r}")
    check_shape(file, b, (r, cols))
    return FactorLayout((a, b), rows, cols, min(rows, cols, r))


def load_factor(file: WeightsFile, layout: FactorLayout) -> torch.Tensor:
    if len(layout.keys) == 1:
        return file.tensor(layout.keys[0])
    a, b = (file.tensor(key) for key in layout.keys)
    product = a @ b
    if not torch.isfinite(product).all():
        raise file.error(f"{layout.keys[0]!r} @ {layout.keys[1]!r} overflows float32")
    return product

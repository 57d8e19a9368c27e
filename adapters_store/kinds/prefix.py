"""Prefix tuning (PEFT `peft_type: PREFIX_TUNING`): per-layer keys and values prepended to attention.

PEFT directory semantics (peft 0.21 `peft_model.py` `get_prompt`, `tuners/tuners_utils.py`
`BasePromptEncoder._get_adapter_state_dict`, `utils/other.py` `_prepare_prompt_learning_config`):
- one tensor `prompt_embeddings` [P, num_layers * 2 * token_dim], P = `num_virtual_tokens`. It always holds the
  final keys and values: with `prefix_projection: true` PEFT saves the MLP's output, not the MLP;
- `get_prompt` views it as [batch, P, num_layers * 2, H, token_dim // H] (H = `num_attention_heads`), permutes to
  [num_layers * 2, batch, H, P, head_dim] and splits in pairs: layer l's key is row 2l, its value row 2l + 1;
- for grouped-query models PEFT sets `num_attention_heads` to the base's key/value heads and `token_dim` to
  kv_heads * head_dim, so the prefix is the KV cache itself (no repetition over query groups);
- `num_transformer_submodules: 2` (encoder-decoder) duplicates the prefix for cross-attention: refused.
`kv` = [num_layers, 2 (key, value), P, num_kv_heads, head_dim] float32. A prefix changes no weight: `modules()` is
empty and merging is refused. `rank` is P.
"""

from __future__ import annotations

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
    open_weights,
)

KEY = "prompt_embeddings"


@dataclass(frozen=True, slots=True, eq=False)
class PrefixAdapter:
    name: str
    path: Path
    base: BaseModelShape
    kv: torch.Tensor  # [num_layers, 2, P, num_kv_heads, head_dim]
    num_parameters: int
    rank: int  # P, the number of virtual tokens
    kind: AdapterKind = field(default=AdapterKind.PREFIX, init=False)
    merge_exact: bool = field(default=False, init=False)

    @classmethod
    def load(cls, path: Path, config: dict[str, Any], base: BaseModelShape, name: str) -> PrefixAdapter:
        num_tokens = config_int(config, "num_virtual_tokens")
        expected = {
            "num_layers": base.num_layers,
            "num_attention_heads": base.num_kv_heads,
            "token_dim": base.kv_dim,
        }
        for field_name, want in expected.items():
            got = config_int(config, field_name)
            if got != want:
                gqa = " (PEFT stores key/value heads and kv_heads * head_dim for grouped-query models)"
                raise AdapterError(
                    f"{field_name}={got} does not match the base model's {want}"
                    + (gqa if field_name != "num_layers" else ""),
                    CONFIG_FILE,
                )
        submodules = config.get("num_transformer_submodules", 1)
        if submodules not in (None, 1):
            raise AdapterError(
                f"num_transformer_submodules={submodules!r} is not supported: only decoder-only models (1)", CONFIG_FILE
            )
        config_bool(config, "prefix_projection")  # either way the file holds the projected prefix
        with open_weights(path / WEIGHTS_FILE) as file:
            extra = sorted(set(file.shapes) - {KEY})
            if extra:
                raise file.error(f"unexpected tensor {extra[0]!r}; a prefix adapter holds only {KEY!r}")
            if KEY not in file.shapes:
                raise file.error(f"missing tensor {KEY!r}")
            check_shape(file, KEY, (num_tokens, base.num_layers * 2 * base.kv_dim))
            embeddings = check_served(file.tensor(KEY), f"tensor {KEY!r}")
        # [P, L * 2 * kv_dim] -> [P, L, 2, H, D] -> [L, 2, P, H, D]
        kv = embeddings.view(num_tokens, base.num_layers, 2, base.num_kv_heads, base.head_dim)
        kv = kv.permute(1, 2, 0, 3, 4).contiguous()
        return cls(name=name, path=path, base=base, kv=kv, num_parameters=kv.numel(), rank=num_tokens)

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[2]

    def modules(self) -> list[tuple[int, str]]:
        return []

    def delta(self, layer: int, module: str) -> torch.Tensor:
        raise self._cannot_merge()

    def probe(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        raise self._cannot_merge()

    def merge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        raise self._cannot_merge()

    def unmerge(self, weight: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        raise self._cannot_merge()

    def merge_bias(self, bias: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        raise self._cannot_merge()

    def _cannot_merge(self) -> AdapterError:
        return AdapterError(f"{self.name}: a prefix adapter adds key/value positions and cannot be merged into weights")

"""What the base model's weights take as vLLM holds them, from the checkpoint's safetensors headers (no tensor is
read): the `base_weight_bytes` of /metrics and the start-up line, split as the native engine splits them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

# Projections inside decoder layers: the "linear" share (everything else: embeddings, norms, lm_head).
LINEAR_SUFFIXES = tuple(
    f"{name}.{part}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for part in ("weight", "bias")
)


def checkpoint_weight_bytes(model_dir: Path, dtype: torch.dtype) -> dict[str, int]:
    """{"linear", "other", "total"} bytes of every tensor in `model_dir/*.safetensors`, held in `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    linear = other = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                if name.endswith(LINEAR_SUFFIXES):
                    linear += numel * size
                else:
                    other += numel * size
    return {"linear": linear, "other": other, "total": linear + other}

"""Read a Hugging Face `config.json` into the few numbers our Llama-family model needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchboard.adapters_store.kinds.base import BaseModelShape

# model_type -> whether q/k/v carry a bias by default
SUPPORTED_MODEL_TYPES: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": True}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint is not one of the architectures this server implements."""


@dataclass(slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # {"rope_type": "llama3"|"linear", ...}
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    checkpoint_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def base_shape(self) -> BaseModelShape:
        """What adapters are validated against, for every engine that serves this model."""
        return BaseModelShape(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = raw.get("architectures") or [model_type or "unknown"]
            raise UnsupportedModelError(
                f"unsupported architecture {', '.join(archs)} (model_type {model_type!r}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama, Mistral, Qwen2)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu / SwiGLU)")
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        # transformers 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        sliding = raw.get("sliding_window") if raw.get("use_sliding_window", model_type == "mistral") else None
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=rope,
            qkv_bias=bool(raw.get("attention_bias", SUPPORTED_MODEL_TYPES[model_type])),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_token_ids(raw.get("eos_token_id")),
            checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """config.json, with generation_config.json's end-of-sequence ids added: instruct checkpoints list there
        every token that ends a turn (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>), config.json often one."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; --model must be a Hugging Face model directory")
        cfg = cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        generation = Path(model_dir) / "generation_config.json"
        if generation.is_file():
            for token in _token_ids(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id")):
                if token not in cfg.eos_token_ids:
                    cfg.eos_token_ids.append(token)
        return cfg


def _token_ids(value: object) -> list[int]:
    """An `eos_token_id` field: absent, one id or a list of ids."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]  # type: ignore[union-attr]

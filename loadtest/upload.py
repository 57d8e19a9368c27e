"""Generate N seeded LoRA adapters for a base checkpoint (PEFT format) and upload them with `POST /v1/adapters`.

The adapters target q, k, v, o at rank r with small random values: a load test measures cost, not quality. Shapes
come from the checkpoint's config.json, so no model weights are read.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
OCTET = "application/octet-stream"


def lora_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """target -> (in_features, out_features) of a Llama-family attention projection."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads") or heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "_layers": (cfg["num_hidden_layers"], 0),
    }


def lora_files(model_dir: Path, rank: int, seed: int) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of one seeded LoRA adapter."""
    shapes = lora_shapes(model_dir)
    layers = shapes.pop("_layers")[0]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for target, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": str(model_dir),
    }
    return json.dumps(config).encode(), save(tensors)


def upload_adapters(
    url: str, model_dir: Path, count: int, rank: int, seed: int, api_key: str | None = None, prefix: str = "loadtest"
) -> list[str]:
    """Upload `count` adapters named PREFIX-SEED-I (overwriting any of the same id); returns their ids."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ids = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        for i in range(count):
            adapter_id = f"{prefix}-{seed}-{i}"
            config, weights = lora_files(model_dir, rank, seed * 100_003 + i)
            files = {
                "adapter_config.json": ("adapter_config.json", io.BytesIO(config), "application/json"),
                "adapter_model.safetensors": ("adapter_model.safetensors", io.BytesIO(weights), OCTET),
            }
            resp = client.post(
                "/v1/adapters", params={"overwrite": "true"}, data={"adapter_id": adapter_id}, files=files
            )
            if resp.status_code not in (200, 201):
                raise RuntimeError(f"uploading {adapter_id} failed: HTTP {resp.status_code}: {resp.text[:500]}")
            ids.append(adapter_id)
    return ids

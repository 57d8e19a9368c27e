"""Generate N seeded LoRA adapters for a base checkpoint (PEFT format) and upload them with `POST /v1/adapters`.

The adapters target q, k, v, o at rank r with small random values: a load test measures cost, not quality. Shapes
come from the checkpoint's config.json, so no model weights are read (`switchboard.adapters_store.synthetic`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE, BaseModelShape

OCTET = "application/octet-stream"


def lora_files(model_dir: Path, rank: int, seed: int) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of one seeded LoRA adapter on q, k, v and o."""
    base = BaseModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    files = synthetic.lora_files(base, rank=rank, seed=seed)
    return files[CONFIG_FILE], files[WEIGHTS_FILE]


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

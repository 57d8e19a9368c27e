"""Adapter uploads for the store tests: PEFT-format LoRA files written directly with safetensors (fast enough for a
thousand), multipart helpers, and a hash of a store's whole tree (to prove a refused upload changed nothing)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save

from switchboard.adapters_store.kinds import BaseModelShape
from switchboard.adapters_store.kinds.base import CONFIG_FILE, TARGET_MODULES, WEIGHTS_FILE

Files = dict[str, bytes]


def base_shape(model_dir: Path) -> BaseModelShape:
    return BaseModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))


def lora_tensors(
    base: BaseModelShape, *, rank: int = 2, seed: int = 0, modules: tuple[str, ...] = ("q_proj", "v_proj")
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base.num_layers):
        for module in modules:
            out, inp = base.module_shape(module)
            key = f"base_model.model.model.layers.{layer}.{TARGET_MODULES[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.5
    return tensors


def lora_config(rank: int = 2, modules: tuple[str, ...] = ("q_proj", "v_proj"), **extra: object) -> dict[str, object]:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules), **extra}


def lora_files(base: BaseModelShape, *, rank: int = 2, seed: int = 0) -> Files:
    return {
        CONFIG_FILE: json.dumps(lora_config(rank)).encode(),
        WEIGHTS_FILE: save(lora_tensors(base, rank=rank, seed=seed)),
    }


def dir_files(path: Path) -> Files:
    return {name: (path / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def huge_ia3_files(ia3_dir: Path) -> Files:
    """The (IA)3 adapter of `ia3_dir` with one component of layer 0's k_proj vector set to 3e38 (finite in float32,
    not once served)."""
    tensors = load_file(ia3_dir / WEIGHTS_FILE)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"][0, 0] = 3e38
    return {CONFIG_FILE: (ia3_dir / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: save(tensors)}


def upload(
    http: httpx.Client,
    adapter_id: str,
    files: Files,
    *,
    key: str | None = None,
    overwrite: bool = False,
    public: bool = False,
) -> httpx.Response:
    params = {}
    if overwrite:
        params["overwrite"] = "true"
    if public:
        params["public"] = "true"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    multipart = {name: (name, data, "application/octet-stream") for name, data in files.items()}
    return http.post("/v1/adapters", data={"adapter_id": adapter_id}, files=multipart, params=params, headers=headers)


def tree_digest(root: Path) -> str:
    """sha256 over every path and file content under `root` (directories included, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()

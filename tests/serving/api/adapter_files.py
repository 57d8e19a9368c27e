"""Adapter uploads for the store tests: PEFT-format LoRA files written directly with safetensors (fast enough for a
thousand), multipart helpers, and a hash of a store's whole tree (to prove a refused upload changed nothing)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds import BaseModelShape
from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE
from switchboard.adapters_store.synthetic import Files


def base_shape(model_dir: Path) -> BaseModelShape:
    return BaseModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))


QV = ("q_proj", "v_proj")


def lora_tensors(
    base: BaseModelShape, *, rank: int = 2, seed: int = 0, modules: tuple[str, ...] = QV
) -> dict[str, torch.Tensor]:
    """The store tests' LoRA tensors (q and v, rank 2, A and B of scale 0.5): `synthetic.lora_tensors`."""
    return synthetic.lora_tensors(base, rank=rank, modules=modules, seed=seed, a_scale=0.5, b_scale=0.5)


def lora_config(rank: int = 2, modules: tuple[str, ...] = QV, **extra: object) -> dict[str, object]:
    return synthetic.lora_config(rank, modules, **extra)


def lora_files(base: BaseModelShape, *, rank: int = 2, seed: int = 0) -> Files:
    return synthetic.lora_files(base, rank=rank, modules=QV, seed=seed, a_scale=0.5, b_scale=0.5)


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

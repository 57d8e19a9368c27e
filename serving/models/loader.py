"""Load a Hugging Face safetensors checkpoint (one file or a sharded index) into our packed model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from .config import ModelConfig
from .linear import AdapterLinear
from .llama import LlamaModel
from .quant import NF4Path, quantize_nf4


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint; pickle checkpoints are refused (never unpickle)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ValueError(f"{model_dir}: only safetensors checkpoints are loaded (found pickle .bin/.pt files)")
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def _param_targets(model: LlamaModel) -> dict[str, tuple[torch.Tensor, slice | None]]:
    """Hugging Face tensor name -> (our parameter, rows of it) for every tensor the checkpoint must provide."""
    targets: dict[str, tuple[torch.Tensor, slice | None]] = {
        "model.embed_tokens.weight": (model.embed_tokens.weight, None),
        "model.norm.weight": (model.norm.weight, None),
    }
    if model.lm_head is not None:
        targets["lm_head.weight"] = (model.lm_head, None)
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        targets[prefix + "input_layernorm.weight"] = (layer.input_layernorm.weight, None)
        targets[prefix + "post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, None)
        linears: list[tuple[str, AdapterLinear]] = [
            ("self_attn.", layer.self_attn.qkv),
            ("self_attn.", layer.self_attn.o_proj),
            ("mlp.", layer.mlp.gate_up),
            ("mlp.", layer.mlp.down_proj),
        ]
        for scope, linear in linears:
            for part in linear.parts:
                rows = slice(part.start, part.stop)
                targets[f"{prefix}{scope}{part.name}.weight"] = (linear.weight, rows)
                if linear.bias is not None:
                    targets[f"{prefix}{scope}{part.name}.bias"] = (linear.bias, rows)
    return targets


def load_model(
    model_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_positions: int | None = None,
    quantize: Literal["none", "nf4"] = "none",
    nf4_path: NF4Path = "auto",
) -> LlamaModel:
    """Build the model from `config.json` and fill every parameter from the checkpoint; nothing may be missing.

    With `quantize="nf4"` the checkpoint is read in float32, every linear is quantised to NF4 from those values
    (as transformers' load_in_4bit does), and the rest (embeddings, norms, lm_head) is cast to `dtype`, the dtype
    the NF4 products compute in.
    """
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaModel(cfg, max_positions=1)
    final_dtype, dtype = dtype, (torch.float32 if quantize == "nf4" else dtype)
    model = model.to_empty(device="cpu").to(dtype)
    targets = _param_targets(model)
    seen: set[str] = set()
    for name, tensor in iter_tensors(checkpoint_files(model_dir)):
        if name not in targets:
            if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                continue
            raise ValueError(f"{model_dir}: unexpected tensor {name!r} for a {cfg.model_type} model")
        param, rows = targets[name]
        dest = param.data if rows is None else param.data[rows]
        if dest.shape != tensor.shape:
            raise ValueError(
                f"{model_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
            )
        dest.copy_(tensor.to(dtype))
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model = model.to(device).eval()
    if quantize == "nf4":
        quantize_nf4(model, final_dtype, nf4_path)
        model = model.to(final_dtype)
    model.set_max_positions(max_positions or cfg.max_position_embeddings)
    return model

"""Seeded synthetic LoRA adapters (`adapters_store.synthetic`): valid for the base model, and one seed one adapter."""

from __future__ import annotations

from pathlib import Path

from switchboard.adapters_store import synthetic
from switchboard.adapters_store.kinds import BaseModelShape
from switchboard.adapters_store.kinds.base import ALL_LINEAR
from switchboard.adapters_store.kinds.registry import load_adapter


def test_a_synthetic_lora_loads_and_a_seed_names_one_adapter(base_shape: BaseModelShape, tmp_path: Path) -> None:
    files = synthetic.lora_files(base_shape, rank=4, modules=ALL_LINEAR, seed=7)
    assert files == synthetic.lora_files(base_shape, rank=4, modules=ALL_LINEAR, seed=7)
    assert files != synthetic.lora_files(base_shape, rank=4, modules=ALL_LINEAR, seed=8)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    adapter = load_adapter(tmp_path, base_shape)
    assert sorted({module for _, module in adapter.modules()}) == sorted(ALL_LINEAR)

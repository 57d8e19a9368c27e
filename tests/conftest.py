"""Shared fixtures: a small seeded checkpoint and PEFT adapters of every kind, built locally (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PeftConfig, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from switchboard.serving.demo import build_demo_model, tiny_spec
from switchboard.serving.demo_adapters import ALL_LINEAR, seed_adapter_weights


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama with grouped-query attention and the demo tokenizer."""
    return build_demo_model(tmp_path_factory.mktemp("tiny-model"), tiny_spec())


def peft_configs() -> dict[str, tuple[PeftConfig, int]]:
    """name -> (config, seed). Eight adapters over the four kinds."""
    return {
        "lora": (LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False), 1),
        "lora-rslora": (
            LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_rslora=True, init_lora_weights=False),
            2,
        ),
        "lokr-full": (
            LoKrConfig(r=16, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
            3,
        ),
        "lokr-decomposed": (
            LoKrConfig(
                r=2,
                alpha=4,
                target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                decompose_both=True,
                init_weights=False,
            ),
            4,
        ),
        "ia3": (
            IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                init_ia3_weights=False,
            ),
            5,
        ),
        "prefix": (PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"), 6),
        "prefix-b": (PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), 7),
        "lora-qv": (LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 8),
    }


@pytest.fixture(scope="session")
def peft_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, (config, seed) in peft_configs().items():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(base, config)
        seed_adapter_weights(model, seed)
        out[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        model.save_pretrained(out[name])
    return out

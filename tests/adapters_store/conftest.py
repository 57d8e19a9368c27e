"""A tiny seeded Llama with grouped-query attention, and PEFT adapters of every kind saved from it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from switchboard.adapters_store.kinds import BaseModelShape

MakePeft = Callable[[PeftConfig, str], tuple[PeftModel, Path]]


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def base_shape(tiny_llama: LlamaForCausalLM) -> BaseModelShape:
    return BaseModelShape.from_hf_config(tiny_llama.config.to_dict())


@pytest.fixture(scope="session")
def make_peft(tiny_llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> MakePeft:
    """Wrap a fresh copy of the tiny model with `config` (seeded weights) and save it under a new directory."""

    def make(config: PeftConfig, name: str) -> tuple[PeftModel, Path]:
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(tiny_llama), config)
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out)
        return model, out

    return make

"""Shared fixtures: small seeded checkpoints built locally (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from switchboard.serving.demo import build_demo_model, tiny_spec


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama with grouped-query attention and the demo tokenizer."""
    return build_demo_model(tmp_path_factory.mktemp("tiny-model"), tiny_spec())

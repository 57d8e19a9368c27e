"""`switchboard serve --backend vllm` as an operator starts it (tests/serve_process.py), on a tiny seeded model that
vLLM's CPU attention accepts (head size 32: it takes 32 and up), with seeded PEFT adapters of every kind.

These tests run in `make test-vllm` (vLLM's own venv, .venv-vllm); each module skips where vLLM is not importable,
as in the normal suite. vLLM's caches and config go under the session's temporary directory, and it sends no
usage report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from peft import IA3Config, LoKrConfig, LoraConfig, PeftConfig, PrefixTuningConfig

from switchboard.adapters_store.kinds.base import ALL_LINEAR
from switchboard.serving.demo import build_demo_model, tiny_spec
from switchboard.serving.demo_adapters import build_adapter

from ..serve_process import ServeProcess

os.environ.update(
    {
        "VLLM_CONFIG_ROOT": os.path.join(os.environ["SWITCHBOARD_TEST_CACHES"], "vllm-config"),
        "VLLM_CACHE_ROOT": os.path.join(os.environ["SWITCHBOARD_TEST_CACHES"], "vllm"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
)

# A start takes 2-4 minutes on two busy cores: vLLM imports for about a minute, then starts its engine process; the
# native server builds its C++ kernels in the session's fresh cache first.
STARTUP_S = 600
MAX_MODEL_LEN = 512
# The same context and float32 on both backends: greedy tokens must agree.
COMMON_FLAGS = ("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN))
VLLM_FLAGS = (*COMMON_FLAGS, "--backend", "vllm", "--kv-cache-gb", "0.25", "--max-resident-adapters", "4")
NATIVE_FLAGS = (*COMMON_FLAGS, "--device", "cpu", "--num-kv-blocks", "512")


def adapter_configs() -> dict[str, tuple[PeftConfig, int]]:
    """name -> (config, seed): two LoRAs (one for an overwrite), and one adapter of each kind vLLM cannot serve."""
    return {
        "lora": (LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_LINEAR), init_lora_weights=False), 1),
        "lora-v2": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 2),
        "ia3": (
            IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            3,
        ),
        "prefix": (PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), 4),
        "krona": (LoKrConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False), 5),
    }


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny float32 Llama (grouped-query attention, the demo tokenizer), with head size 32."""
    return build_demo_model(tmp_path_factory.mktemp("vllm-model"), tiny_spec(hidden_size=128))


@pytest.fixture(scope="session")
def vllm_adapters(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: build_adapter(vllm_model_dir, config, tmp_path_factory.mktemp(f"adapter-{name}"), seed)
        for name, (config, seed) in adapter_configs().items()
    }


@pytest.fixture(scope="session")
def vllm_server(
    vllm_model_dir: Path, vllm_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    """One vLLM-backed server for the session: the LoRA and the (IA)3 adapter at start-up (the latter listed, but
    refused at request time), uploads into its own store."""
    workdir = tmp_path_factory.mktemp("vllm-serve")
    flags = (*VLLM_FLAGS, "--adapter", f"lora={vllm_adapters['lora']}", "--adapter", f"ia3={vllm_adapters['ia3']}")
    with ServeProcess(workdir, vllm_model_dir, *flags, startup_timeout_s=STARTUP_S) as server:
        yield server


@pytest.fixture(scope="session")
def native_server(
    vllm_model_dir: Path, vllm_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    workdir = tmp_path_factory.mktemp("native-serve")
    flags = (*NATIVE_FLAGS, "--adapter", f"lora={vllm_adapters['lora']}")
    with ServeProcess(workdir, vllm_model_dir, *flags, startup_timeout_s=STARTUP_S) as server:
        yield server

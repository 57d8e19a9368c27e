"""Malformed or incompatible PEFT directories: each is refused with an AdapterError naming the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoKrConfig, LoraConfig, PrefixTuningConfig
from safetensors.torch import load_file, save_file

from switchboard.adapters_store.kinds import AdapterError, BaseModelShape, load_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def lora_dir(make_peft) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return make_peft(config, "lora-valid")[1]


@pytest.fixture
def broken(lora_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """A copy of the valid LoRA directory, with its tensors and/or config edited."""

    def edit(tensors: Callable[[dict], None] | None = None, config: Callable[[dict], None] | None = None) -> Path:
        out = tmp_path / "adapter"
        shutil.copytree(lora_dir, out)
        if tensors is not None:
            loaded = load_file(out / WEIGHTS)
            tensors(loaded)
            save_file(loaded, out / WEIGHTS)
        if config is not None:
            raw = json.loads((out / CONFIG).read_text())
            config(raw)
            (out / CONFIG).write_text(json.dumps(raw))
        return out

    return edit


def refused(path: Path, base: BaseModelShape, file: str, *fragments: str) -> None:
    with pytest.raises(AdapterError) as caught:
        load_adapter(path, base)
    message = str(caught.value)
    assert message.startswith(f"{file}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_valid_directory_loads(lora_dir: Path, base_shape: BaseModelShape) -> None:
    assert load_adapter(str(lora_dir), base_shape).modules() == [
        (0, "q_proj"),
        (0, "v_proj"),
        (1, "q_proj"),
        (1, "v_proj"),
    ]


def test_wrong_shape(broken, base_shape: BaseModelShape) -> None:
    path = broken(tensors=lambda t: t.update({Q_A: torch.randn(4, 32)}))
    refused(path, base_shape, WEIGHTS, Q_A, "shape [4, 32], expected [4, 64]")


def test_rank_differs_from_config(broken, base_shape: BaseModelShape) -> None:
    path = broken(tensors=lambda t: t.update({Q_A: torch.randn(2, 64), Q_B: torch.randn(64, 2)}))
    refused(path, base_shape, WEIGHTS, "rank 2", "r=4")


def test_unknown_module(broken, base_shape: BaseModelShape) -> None:
    path = broken(tensors=lambda t: t.update({Q_A.replace("q_proj", "x_proj"): t.pop(Q_A)}))
    refused(path, base_shape, WEIGHTS, "x_proj", "unknown module")


def test_layer_out_of_range(broken, base_shape: BaseModelShape) -> None:
    path = broken(tensors=lambda t: t.update({Q_A.replace("layers.0", "layers.7"): t.pop(Q_A)}))
    refused(path, base_shape, WEIGHTS, "layer 7", "has 2")


def test_missing_half(broken, base_shape: BaseModelShape) -> None:
    path = broken(tensors=lambda t: t.pop(Q_B))
    refused(path, base_shape, WEIGHTS, Q_A, "lora_B")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(broken, base_shape: BaseModelShape, bad: float) -> None:
    def poison(tensors: dict) -> None:
        tensors[Q_B][1, 2] = bad

    refused(broken(tensors=poison), base_shape, WEIGHTS, Q_B, "NaN or Inf")


def test_pickle_only_directory_is_never_loaded(broken, base_shape, monkeypatch) -> None:
    path = broken()
    (path / WEIGHTS).unlink()
    (path / "adapter_model.bin").write_bytes(b"\x80\x04 a pickle that must not be opened")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    refused(path, base_shape, WEIGHTS, "adapter_model.bin", "pickle files are never loaded")


def test_not_safetensors(broken, base_shape: BaseModelShape) -> None:
    path = broken()
    (path / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    refused(path, base_shape, WEIGHTS, "not a valid safetensors file")


def test_unknown_peft_type(broken, base_shape: BaseModelShape) -> None:
    path = broken(config=lambda c: c.update(peft_type="VERA"))
    refused(path, base_shape, CONFIG, "'VERA'", "LORA, LOKR, IA3, PREFIX_TUNING")


def test_dora(broken, base_shape: BaseModelShape) -> None:
    refused(broken(config=lambda c: c.update(use_dora=True)), base_shape, CONFIG, "DoRA (use_dora) is not supported")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lora_bias", True),
        ("fan_in_fan_out", True),
        ("modules_to_save", ["lm_head"]),
        ("layer_replication", [[0, 2]]),
        ("bias", "all"),
        ("init_lora_weights", "pissa"),
    ],
)
def test_unsupported_lora_options(broken, base_shape: BaseModelShape, option: str, value) -> None:
    refused(broken(config=lambda c: c.update({option: value})), base_shape, CONFIG, option, "not supported")


def test_dora_tensors_refused_even_without_use_dora(make_peft, base_shape: BaseModelShape) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    _, path = make_peft(config, "dora")
    refused(path, base_shape, CONFIG, "DoRA (use_dora) is not supported")
    raw = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps({**raw, "use_dora": False}))
    refused(path, base_shape, WEIGHTS, "lora_magnitude_vector", "DoRA (use_dora) is not supported")


def test_config_not_json(broken, base_shape: BaseModelShape) -> None:
    path = broken()
    (path / CONFIG).write_text('{"peft_type": "LORA",')
    refused(path, base_shape, CONFIG, "not valid JSON")


def test_config_not_utf8(broken, base_shape: BaseModelShape) -> None:
    path = broken()
    (path / CONFIG).write_bytes(b'{"peft_type": "\xff"}')
    refused(path, base_shape, CONFIG, "not UTF-8")


def test_missing_config(broken, base_shape: BaseModelShape) -> None:
    path = broken()
    (path / CONFIG).unlink()
    refused(path, base_shape, CONFIG, "missing")


def test_lokr_tucker_core_refused(make_peft, base_shape: BaseModelShape) -> None:
    _, path = make_peft(LoKrConfig(r=16, target_modules=["q_proj"], init_weights=False), "lokr-t2")
    tensors = load_file(path / WEIGHTS)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lokr_t2"] = torch.ones(2, 2, 1, 1)
    save_file(tensors, path / WEIGHTS)
    refused(path, base_shape, WEIGHTS, "lokr_t2", "convolutions only")


def test_lokr_factor_shapes_must_multiply_to_the_module(make_peft, base_shape: BaseModelShape) -> None:
    _, path = make_peft(LoKrConfig(r=16, target_modules=["q_proj"], init_weights=False), "lokr-bad")
    tensors = load_file(path / WEIGHTS)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lokr_w2"] = torch.randn(8, 4)
    save_file(tensors, path / WEIGHTS)
    refused(path, base_shape, WEIGHTS, "layer 0 q_proj", "expected [64, 64]")


def test_prefix_must_match_kv_heads(make_peft, base_shape: BaseModelShape) -> None:
    _, path = make_peft(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefix-heads")
    raw = json.loads((path / CONFIG).read_text())
    raw.update(num_attention_heads=4, token_dim=64)  # what PEFT wrote before it handled grouped-query attention
    (path / CONFIG).write_text(json.dumps(raw))
    refused(path, base_shape, CONFIG, "num_attention_heads=4", "match the base model's 2")


@pytest.mark.parametrize(
    ("targets", "file", "fragment"),
    [
        ({"target_modules": ["q_proj"]}, WEIGHTS, "tensors for model.layers.0.self_attn.v_proj"),
        ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, CONFIG, "targets model.layers.0.self_attn.k_proj"),
        ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, CONFIG, "'lm_head', which is not a projection"),
        ({"target_modules": ".*\\.q_proj"}, WEIGHTS, "tensors for model.layers.0.self_attn.v_proj"),
        ({"target_modules": "all-linear"}, CONFIG, "targets model.layers.0.mlp.down_proj"),
        ({"layers_to_transform": [1]}, WEIGHTS, "tensors for model.layers.0.self_attn.q_proj"),
        ({"exclude_modules": ["layers.1.self_attn.v_proj"]}, WEIGHTS, "tensors for model.layers.1.self_attn.v_proj"),
        ({"target_modules": 3}, CONFIG, "target_modules must be"),
        ({"target_modules": "ALL-LINEAR"}, CONFIG, "targets model.layers.0.mlp.down_proj"),
        ({"layers_to_transform": [0, 1], "layers_pattern": "h"}, WEIGHTS, "(found by layers_pattern 'h') does not"),
        ({"layers_to_transform": [0, 1], "layers_pattern": "layers|h"}, WEIGHTS, "tensors for model.layers.0"),
        ({"target_modules": ".*\\.(q|v)_proj", "layers_to_transform": [0, 1]}, CONFIG, "need a list of target_mod"),
        ({"layers_pattern": "layers"}, CONFIG, "layers_pattern needs layers_to_transform"),
    ],
)
def test_target_modules_must_cover_the_tensors_exactly(broken, base_shape: BaseModelShape, targets, file, fragment):
    refused(broken(config=lambda c: c.update(targets)), base_shape, file, fragment)


@pytest.mark.parametrize(
    "targets",
    [
        {"target_modules": ["self_attn.q_proj", "v_proj"]},
        {"target_modules": ".*\\.(q|v)_proj"},
        {"target_modules": ["q_proj", "v_proj", "k_proj"], "exclude_modules": ["k_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1]},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1], "layers_pattern": "layers"},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1], "layers_pattern": ["h", "layers"]},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": []},
        {"target_modules": None},
    ],
)
def test_target_modules_that_cover_the_tensors(broken, base_shape: BaseModelShape, targets) -> None:
    assert len(load_adapter(broken(config=lambda c: c.update(targets)), base_shape).modules()) == 4

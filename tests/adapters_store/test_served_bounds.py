"""Adapters are validated as served: after the config's scales are folded in, every tensor and every module's update
of a unit-norm probe input must be finite and within MAX_SERVED_MAGNITUDE (issue 14's attacker: alpha 1e300, an
(IA)3 scale of 3e38)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PrefixTuningConfig
from safetensors.torch import load_file, save_file

from switchboard.adapters_store.kinds import AdapterError, BaseModelShape, load_adapter
from switchboard.adapters_store.kinds.base import MAX_SERVED_MAGNITUDE

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _edit(path: Path, *, tensors: dict[str, torch.Tensor] | None = None, **config: object) -> Path:
    if tensors:
        loaded = load_file(path / WEIGHTS)
        loaded.update(tensors)
        save_file(loaded, path / WEIGHTS)
    if config:
        raw = json.loads((path / CONFIG).read_text())
        raw.update(config)
        (path / CONFIG).write_text(json.dumps(raw))
    return path


def _refused(path: Path, base: BaseModelShape, *fragments: str) -> str:
    with pytest.raises(AdapterError) as caught:
        load_adapter(path, base)
    message = str(caught.value)
    assert message.startswith(f"{WEIGHTS}: "), message
    for fragment in (*fragments, f"at most {MAX_SERVED_MAGNITUDE:g}"):
        assert fragment in message, message
    return message


def _lora(make_peft, name: str) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return make_peft(config, name)[1]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_alpha_1e300(make_peft, base_shape: BaseModelShape, use_rslora: bool) -> None:
    path = _edit(_lora(make_peft, "lora-alpha"), lora_alpha=1e300, use_rslora=use_rslora)
    _refused(path, base_shape, Q_B, "times the scale", "inf")


def test_alpha_pattern_1e300(make_peft, base_shape: BaseModelShape) -> None:
    path = _edit(_lora(make_peft, "lora-alpha-pattern"), alpha_pattern={"v_proj": 1e300})
    _refused(path, base_shape, "v_proj.lora_B.weight", "2.5e+299")


def test_ia3_vector_3e38(make_peft, base_shape: BaseModelShape) -> None:
    _, path = make_peft(IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3")
    key = "base_model.model.model.layers.1.self_attn.k_proj.ia3_l"
    vector = load_file(path / WEIGHTS)[key]
    vector[3, 0] = 3e38
    _refused(_edit(path, tensors={key: vector}), base_shape, key, "3e+38")


def test_lokr_alpha_1e300(make_peft, base_shape: BaseModelShape) -> None:
    _, path = make_peft(LoKrConfig(r=4, target_modules=["q_proj"], init_weights=False), "lokr-alpha")
    _refused(_edit(path, alpha=1e300), base_shape, "lokr_w1", "times the scale")


def test_prefix_embeddings_3e38(make_peft, base_shape: BaseModelShape) -> None:
    _, path = make_peft(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefix-big")
    embeddings = load_file(path / WEIGHTS)["prompt_embeddings"]
    embeddings[0, 0] = -3e38
    _refused(_edit(path, tensors={"prompt_embeddings": embeddings}), base_shape, "prompt_embeddings", "3e+38")


def test_factors_within_the_bound_whose_product_is_not(make_peft, base_shape: BaseModelShape) -> None:
    """Each element at most 2,000, but B @ A of a unit-norm input reaches millions: the probe refuses it."""
    path = _lora(make_peft, "lora-product")
    _edit(path, tensors={Q_A: torch.full((4, 64), 1000.0), Q_B: torch.full((64, 4), 1000.0)})  # scale 2
    message = _refused(path, base_shape, "layer 0 q_proj", "probe input")
    assert "inf" not in message


def test_a_real_adapter_is_far_inside_the_bound(make_peft, base_shape: BaseModelShape) -> None:
    adapter = load_adapter(_lora(make_peft, "lora-real"), base_shape)
    a, b = adapter.weights[(0, "q_proj")]
    assert max(a.abs().max(), b.abs().max()) < MAX_SERVED_MAGNITUDE / 100

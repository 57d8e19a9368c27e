"""Each kind against PEFT itself: our folded tensors, deltas and merges equal PEFT's on a tiny GQA Llama."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PeftModel, PrefixTuningConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from switchboard.adapters_store.kinds import (
    AdapterError,
    AdapterKind,
    BaseModelShape,
    IA3Adapter,
    KronaAdapter,
    LoraAdapter,
    PrefixAdapter,
    load_adapter,
)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARENT = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def peft_layers(model: PeftModel) -> dict[tuple[int, str], BaseTunerLayer]:
    """PEFT's adapter-wrapped projections by (layer, module)."""
    found = {}
    for name, module in model.named_modules():
        match = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", name)
        if match and isinstance(module, BaseTunerLayer):
            found[(int(match[1]), match[2])] = module
    return found


def file_elements(path: Path) -> int:
    return sum(t.numel() for t in load_file(path / "adapter_model.safetensors").values())


def check_against_peft(adapter, model: PeftModel, *, additive: bool) -> None:
    """delta == PEFT's get_delta_weight; merge == PEFT's merge_and_unload; unmerge(merge(W)) == W."""
    layers = peft_layers(model)
    assert adapter.modules() == sorted(layers)
    originals = {key: layer.get_base_layer().weight.detach().clone() for key, layer in layers.items()}
    if additive:
        for (index, module), layer in layers.items():
            assert_close(adapter.delta(index, module), layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    merged = dict(model.merge_and_unload().named_parameters())
    for (index, module), weight in originals.items():
        ours = adapter.merge(weight, index, module)
        theirs = merged[f"model.layers.{index}.{PARENT.get(module, 'self_attn')}.{module}.weight"]
        assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert_close(adapter.unmerge(ours, index, module), weight, atol=1e-5, rtol=1e-5)
        half = adapter.merge(weight.to(torch.bfloat16), index, module)
        assert half.dtype == torch.bfloat16
    for module in LINEAR:
        if (0, module) not in layers:  # an untouched module comes back as is
            weight = torch.randn(adapter.base.module_shape(module))
            assert adapter.merge(weight, 0, module) is weight


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_peft(make_peft, base_shape: BaseModelShape, use_rslora: bool) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR, init_lora_weights=False, use_rslora=use_rslora)
    model, path = make_peft(config, f"lora-rslora-{use_rslora}")
    adapter = load_adapter(path, base_shape, name="mine")
    assert isinstance(adapter, LoraAdapter)
    assert (adapter.name, adapter.kind, adapter.rank, adapter.merge_exact) == ("mine", AdapterKind.LORA, 4, True)
    assert adapter.num_parameters == file_elements(path)
    assert len(adapter.modules()) == 2 * len(LINEAR)
    a, b = adapter.weights[(1, "down_proj")]
    assert (a.shape, b.shape, a.dtype) == ((4, 128), (64, 4), torch.float32)
    check_against_peft(adapter, model, additive=True)


@pytest.mark.parametrize("layers_pattern", [None, "layers"])
def test_lora_rank_and_alpha_patterns(make_peft, base_shape: BaseModelShape, layers_pattern: str | None) -> None:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"v_proj": 3},
        layers_to_transform=[1],
        layers_pattern=layers_pattern,
        init_lora_weights=False,
    )
    model, path = make_peft(config, f"lora-patterns-{layers_pattern}")
    adapter = load_adapter(path, base_shape)
    assert adapter.modules() == [(1, "down_proj"), (1, "q_proj"), (1, "v_proj")]
    assert adapter.rank == 6 and adapter.weights[(1, "q_proj")][0].shape == (2, 64)
    check_against_peft(adapter, model, additive=True)


@pytest.mark.parametrize(
    ("r", "decompose_both", "expect_rank"),
    [(16, False, 64), (2, True, 4)],
    ids=["full-factors", "decomposed-factors"],
)
def test_krona_matches_peft(make_peft, base_shape: BaseModelShape, r, decompose_both, expect_rank) -> None:
    config = LoKrConfig(r=r, alpha=5, target_modules=LINEAR, decompose_both=decompose_both, init_weights=False)
    model, path = make_peft(config, f"lokr-{r}")
    stored = load_file(path / "adapter_model.safetensors")
    decomposed = any(key.endswith("lokr_w1_a") for key in stored)
    assert decomposed == decompose_both and any(key.endswith("lokr_w2_a") for key in stored) == decompose_both
    adapter = load_adapter(path, base_shape)
    assert isinstance(adapter, KronaAdapter)
    assert (adapter.kind, adapter.rank, adapter.merge_exact) == (AdapterKind.KRONA, expect_rank, True)
    assert adapter.num_parameters == file_elements(path)
    w1, w2 = adapter.factors[(0, "down_proj")]  # out 64 = 8 * 8, in 128 = 8 * 16
    assert (w1.shape, w2.shape) == ((8, 8), (8, 16))
    check_against_peft(adapter, model, additive=True)


def test_ia3_matches_peft(make_peft, base_shape: BaseModelShape) -> None:
    config = IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    model, path = make_peft(config, "ia3")
    stored = load_file(path / "adapter_model.safetensors")
    assert stored["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 128)
    assert stored["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)
    adapter = load_adapter(path, base_shape)
    assert isinstance(adapter, IA3Adapter)
    assert (adapter.kind, adapter.rank, adapter.merge_exact) == (AdapterKind.IA3, 0, False)
    assert adapter.num_parameters == file_elements(path) == 2 * (32 + 32 + 128)
    assert adapter.vectors[(1, "down_proj")][1] == "input" and adapter.vectors[(1, "v_proj")][1] == "output"
    check_against_peft(adapter, model, additive=False)
    with pytest.raises(AdapterError, match="no additive delta"):
        adapter.delta(0, "k_proj")


def test_ia3_unmerge_refuses_a_zero_component(make_peft, base_shape: BaseModelShape, tmp_path: Path) -> None:
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    _, path = make_peft(config, "ia3-zero")
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"][3, 0] = 0.0
    save_file(tensors, path / "adapter_model.safetensors")
    adapter = load_adapter(path, base_shape)
    merged = adapter.merge(torch.randn(32, 64), 0, "k_proj")
    assert (merged[3] == 0).all()
    with pytest.raises(AdapterError, match="zero component"):
        adapter.unmerge(merged, 0, "k_proj")


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_prefix_matches_peft_prompt(make_peft, base_shape: BaseModelShape, prefix_projection: bool) -> None:
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=prefix_projection, encoder_hidden_size=16
    )
    model, path = make_peft(config, f"prefix-{prefix_projection}")
    adapter = load_adapter(path, base_shape)
    assert isinstance(adapter, PrefixAdapter)
    assert (adapter.kind, adapter.rank, adapter.merge_exact, adapter.modules()) == (AdapterKind.PREFIX, 8, False, [])
    assert adapter.kv.shape == (2, 2, 8, 2, 16)  # [layers, key/value, P, kv heads, head dim]
    assert adapter.num_parameters == file_elements(path)
    with torch.no_grad():
        cache = model.get_prompt(batch_size=1)
    for layer in range(2):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [batch, heads, P, head dim]
        assert_close(adapter.kv[layer, 0], keys[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
        assert_close(adapter.kv[layer, 1], values[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    with pytest.raises(AdapterError, match="cannot be merged"):
        adapter.merge(torch.zeros(32, 64), 0, "k_proj")


def test_base_model_shape(tiny_llama) -> None:
    shape = BaseModelShape.from_hf_config(tiny_llama.config.to_dict())
    assert shape == BaseModelShape(2, 64, 128, 4, 2, 16)
    for name, linear in tiny_llama.model.layers[0].self_attn.named_children():
        assert shape.module_shape(name) == tuple(linear.weight.shape)
    for name, linear in tiny_llama.model.layers[0].mlp.named_children():
        if isinstance(linear, torch.nn.Linear):
            assert shape.module_shape(name) == tuple(linear.weight.shape)
    with pytest.raises(AdapterError, match="unknown target module"):
        shape.module_shape("lm_head")


def test_adapters_store_never_imports_serving() -> None:
    root = Path(__file__).resolve().parents[2] / "adapters_store"
    for source in root.rglob("*.py"):
        text = source.read_text()
        assert "switchboard.serving" not in text and "from ..serving" not in text, source

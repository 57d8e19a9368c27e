"""NF4 base (QLoRA's NF4 with double quantization, bitsandbytes): parity with transformers' load_in_4bit, memory,
shapes the packed CPU kernel cannot take, and every adapter kind unmerged on top (float32 unless said otherwise)."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from switchboard.serving.config import ServeConfig
from switchboard.serving.demo import build_demo_model, tiny_spec
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.models.linear import AdapterLinear
from switchboard.serving.models.quant import NF4Linear, cpu_packing_available, dense_linear_parameters
from switchboard.training.base import load_base

PROMPT = [0, 45, 300, 12, 77, 401, 9, 230, 18, 64, 99, 150]
# Our NF4 codes are asserted equal to transformers' below, and both multiply by the same dequantised float32 weight,
# so what is left is float32 summation order: the same 1e-4 as the dense parity tests. For scale, NF4 itself moves
# these logits by more than 0.1 from the dense model (asserted too), three orders of magnitude above the tolerance.
TOL = 1e-4


def _nf4_engine(model_dir: Path, adapters: dict[str, Path] | None = None, **kw) -> LLMEngine:
    config = ServeConfig(
        model=model_dir, dtype="float32", quantize="nf4", num_kv_blocks=64, adapters=adapters or {}, **kw
    )
    return LLMEngine(config)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, peft_adapters: dict[str, Path]) -> LLMEngine:
    return _nf4_engine(tiny_model_dir, peft_adapters)


def _dequantized_hf(model_dir: Path, engine: LLMEngine) -> torch.nn.Module:
    """transformers' dense float32 model with every projection replaced by our dequantised NF4 weight."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer, ours in zip(hf.model.layers, engine.model.layers, strict=True):
        attn, mlp = ours.self_attn, ours.mlp
        for scope, lin in (
            ("self_attn", attn.qkv),
            ("self_attn", attn.o_proj),
            ("mlp", mlp.gate_up),
            ("mlp", mlp.down_proj),
        ):
            weight = lin.base_matmul.dequantized()
            for part in lin.parts:
                getattr(getattr(layer, scope), part.name).weight.data.copy_(weight[part.start : part.stop])
    return hf.eval()


def test_nf4_codes_and_logits_match_transformers_load_in_4bit(engine: LLMEngine, tiny_model_dir: Path) -> None:
    hf = load_base(tiny_model_dir, "nf4").eval()  # load_in_4bit, NF4, double quantization, float32 compute
    layer, ours = hf.model.layers[1], engine.model.layers[1].self_attn.qkv
    assert isinstance(layer.self_attn.k_proj, bnb.nn.Linear4bit)
    assert layer.self_attn.k_proj.weight.quant_state.nested  # double quantization
    theirs = bnb.functional.dequantize_4bit(
        layer.self_attn.k_proj.weight.data, layer.self_attn.k_proj.weight.quant_state
    )
    k = ours.part("k_proj")
    assert torch.equal(ours.base_matmul.dequantized()[k.start : k.stop], theirs)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([PROMPT])).logits[0]
        dense_logits = dense(input_ids=torch.tensor([PROMPT])).logits[0]
    got = engine.prompt_logits(PROMPT, None)
    assert (got - ref).abs().max().item() <= TOL
    assert (got - dense_logits).abs().max().item() > 0.1  # NF4 really is in the path


def test_base_weight_bytes_are_at_most_0_3_of_fp16(engine: LLMEngine) -> None:
    linear_fp16 = 2 * dense_linear_parameters(engine.model)
    held = engine.base_weight_bytes
    assert held["linear"] <= 0.3 * linear_fp16, (held, linear_fp16)
    assert all(isinstance(lin.base_matmul, NF4Linear) and lin.weight is None for lin in engine.model.linears())
    assert held["total"] == held["linear"] + held["other"]


@pytest.mark.parametrize("name", ["lora", "lora-rslora", "ia3", "prefix", "prefix-b"])
def test_adapters_on_nf4_match_peft_on_transformers_nf4(
    name: str, engine: LLMEngine, tiny_model_dir: Path, peft_adapters: dict[str, Path]
) -> None:
    """LoRA, (IA)3 and prefix: PEFT supports bitsandbytes 4-bit bases, so PEFT on load_in_4bit is the reference."""
    peft = PeftModel.from_pretrained(load_base(tiny_model_dir, "nf4"), peft_adapters[name]).eval()
    with torch.inference_mode():
        ref = peft(input_ids=torch.tensor([PROMPT])).logits[0]
        with peft.disable_adapter():
            base = peft(input_ids=torch.tensor([PROMPT])).logits[0]
    got = engine.prompt_logits(PROMPT, name)
    assert (got - ref).abs().max().item() <= TOL
    assert (ref - base).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", ["lokr-full", "lokr-decomposed", "lora", "ia3", "prefix"])
def test_adapters_on_nf4_match_peft_on_the_dequantized_model(
    name: str, engine: LLMEngine, tiny_model_dir: Path, peft_adapters: dict[str, Path]
) -> None:
    """LoKr (KronA): PEFT's LoKr cannot wrap a 4-bit layer, so the reference is the same model with its NF4 weights
    dequantised to float32 (DESIGN.md); the other kinds are checked the same way as a cross-check."""
    peft = PeftModel.from_pretrained(_dequantized_hf(tiny_model_dir, engine), peft_adapters[name]).eval()
    with torch.inference_mode():
        ref = peft(input_ids=torch.tensor([PROMPT])).logits[0]
    assert (engine.prompt_logits(PROMPT, name) - ref).abs().max().item() <= TOL


@pytest.mark.skipif(not cpu_packing_available(), reason="needs a CPU with AVX-512 bf16")
def test_packed_kernel_equals_bitsandbytes_linear4bit_in_eval() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 96, bias=True)
    ref = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    ref.load_state_dict(dense.state_dict())
    ref = ref.to("cpu").eval()  # quantises here; repacks on its first no-grad forward
    ours = NF4Linear(dense.weight.data, torch.bfloat16, "packed")
    x = torch.randn(7, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ref(x)
        assert ref.weight.quant_state.packing_format_for_cpu
        got = ours(x, None, dense.bias.data.to(torch.bfloat16))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("out_features", [40, 96])
def test_shapes_the_packed_kernel_cannot_take(out_features: int) -> None:
    """bitsandbytes asserts out_features % 32 == 0 when it repacks: ours refuses with a reason or dequantises."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, 64) * 0.1
    if out_features % 32:
        with pytest.raises(ValueError, match=r"layers\.0\.mlp: cannot use the packed NF4 kernel: .*multiple of 32"):
            NF4Linear(weight, torch.bfloat16, "packed", name="layers.0.mlp")
    auto = NF4Linear(weight, torch.bfloat16, "auto")
    packable = out_features % 32 == 0 and cpu_packing_available()
    assert auto.path == ("packed" if packable else "dequantize")
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    expected = x.float() @ auto.dequantized().T
    torch.testing.assert_close(auto(x, None, None).float(), expected, atol=0.05, rtol=0.02)  # bf16 products


def test_a_model_with_unpackable_shapes_serves_in_bf16(tmp_path: Path) -> None:
    # intermediate 72: gate|up has 144 output rows (not a multiple of 32) and down_proj 72 inputs (not of 64)
    model_dir = build_demo_model(tmp_path / "odd", tiny_spec(intermediate_size=72))
    engine = LLMEngine(ServeConfig(model=model_dir, dtype="bfloat16", quantize="nf4", num_kv_blocks=32))
    paths = {type(lin.base_matmul).__name__ + ":" + lin.base_matmul.path for lin in engine.model.linears()}
    assert "NF4Linear:dequantize" in paths
    if cpu_packing_available():
        assert "NF4Linear:packed" in paths  # q|k|v and o_proj still take the packed kernel
    out = engine.generate([[0, 5, 9, 100]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), [None])
    assert len(out[0]) == 8


def test_merging_into_nf4_is_refused(tiny_model_dir: Path, peft_adapters: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unmerged on NF4"):
        _nf4_engine(tiny_model_dir, {"l": peft_adapters["lora"]}, merge_adapter="l")


def test_every_linear_is_an_adapter_linear(engine: LLMEngine) -> None:
    assert len(engine.model.linears()) == 4 * engine.model_config.num_layers
    assert all(isinstance(m, AdapterLinear) for m in engine.model.linears())

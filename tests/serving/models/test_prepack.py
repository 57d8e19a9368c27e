"""bf16 weights packed once (serving/models/prepack.py). oneDNN's packed product gives exactly the products F.linear
gives: every shape of the model's linears and its logits, decode and prefill row counts, a bias, an empty batch; an
engine's greedy tokens are the same with and without it. The engine packs for the AVX-512 BF16 kernel where it runs
(its products are tested in tests/kernels/test_cpu_linear.py): its logits are as close to float32's as F.linear's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from switchboard.kernels import cpu_linear
from switchboard.serving.config import ServeConfig
from switchboard.serving.demo import build_demo_model, tiny_spec
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.models.linear import AdapterLinear
from switchboard.serving.models.prepack import CompiledLinear, PackedLinear, prepack_available, prepack_bf16

pytestmark = pytest.mark.skipif(
    not prepack_available(torch.bfloat16, torch.device("cpu")), reason="torch was built without oneDNN"
)


@pytest.mark.parametrize("rows", [0, 1, 7, 32, 33, 300])
@pytest.mark.parametrize(("out_features", "in_features"), [(1728, 576), (576, 1536), (4096, 576), (96, 64)])
def test_packed_product_is_bit_identical(rows: int, out_features: int, in_features: int) -> None:
    g = torch.Generator().manual_seed(rows + out_features)
    w = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)
    b = torch.randn(out_features, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    packed = PackedLinear(w, batch_hint=32)
    assert torch.equal(packed(x, w, None), F.linear(x, w))
    assert torch.equal(packed(x, w, b), F.linear(x, w, b))
    assert packed(x, w, None).shape == (rows, out_features)


def test_packed_product_reads_a_non_contiguous_input() -> None:
    w = torch.randn(64, 96).to(torch.bfloat16)
    x = torch.randn(96, 10).to(torch.bfloat16).t()  # [10, 96], transposed
    assert torch.equal(PackedLinear(w, 32)(x, w, None), F.linear(x, w))


def _unpack(engine: LLMEngine) -> None:
    """Back to F.linear: the packed products are registered submodules, removed before a function takes their place."""
    for lin in engine.model.linears():
        del lin.base_matmul
        lin.base_matmul = F.linear
    del engine.model.logits_matmul
    engine.model.logits_matmul = F.linear


def test_engine_packs_bf16_and_keeps_its_tokens(tiny_model_dir: Path) -> None:
    """oneDNN's packed products (what the engine packs where the compiled kernel cannot run) change no token."""
    engine = LLMEngine(ServeConfig(model=tiny_model_dir, dtype="bfloat16", device="cpu", kv_cache_gb=0.05))
    _unpack(engine)
    prepack_bf16(engine.model, batch_hint=32, product="onednn")
    linears = engine.model.linears()
    assert all(isinstance(lin.base_matmul, PackedLinear) for lin in linears)
    assert isinstance(engine.model.logits_matmul, PackedLinear)
    assert all(isinstance(lin, AdapterLinear) and lin.weight is not None for lin in linears)  # dense kept
    prompts = [[1, *range(5 + i, 5 + i + 11 + 3 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    packed = engine.generate(prompts, params)
    packed_logits = engine.prompt_logits(prompts[2])
    _unpack(engine)
    assert engine.generate(prompts, params) == packed
    assert torch.equal(engine.prompt_logits(prompts[2]), packed_logits)


@pytest.mark.skipif(
    not cpu_linear.compiled_linear_available(), reason=f"{cpu_linear.compiled_linear_unavailable_reason()}"
)
def test_engine_packs_for_the_compiled_kernel(tmp_path: Path) -> None:
    """Where the AVX-512 BF16 kernel runs, every product is its; the logits stay as close to float32's as F.linear's
    (the sums' order differs, so bit-identity is not the bar). The tiny model's 64-wide sums are exact in float32 in
    either order, so a wider model: 512 and 1536 wide sums, where the orders round differently."""
    model_dir = build_demo_model(
        tmp_path, tiny_spec(hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=2)
    )
    engine = LLMEngine(ServeConfig(model=model_dir, dtype="bfloat16", device="cpu", kv_cache_gb=0.05))
    assert all(isinstance(lin.base_matmul, CompiledLinear) for lin in engine.model.linears())
    assert isinstance(engine.model.logits_matmul, CompiledLinear)
    reference = LLMEngine(ServeConfig(model=model_dir, dtype="float32", device="cpu", kv_cache_gb=0.05))
    prompt = [1, *range(7, 40)]
    exact = reference.prompt_logits(prompt)
    compiled = engine.prompt_logits(prompt)
    _unpack(engine)
    plain = engine.prompt_logits(prompt)
    assert not torch.equal(compiled, plain)  # the kernel ran: its sums round apart from oneDNN's somewhere
    err_compiled, err_plain = (compiled - exact).abs().max().item(), (plain - exact).abs().max().item()
    assert err_compiled <= 1.5 * err_plain, (err_compiled, err_plain)


def test_float32_engine_is_not_packed(tiny_model_dir: Path) -> None:
    engine = LLMEngine(ServeConfig(model=tiny_model_dir, dtype="float32", device="cpu", kv_cache_gb=0.05))
    assert all(lin.base_matmul is F.linear for lin in engine.model.linears())
    assert engine.model.logits_matmul is F.linear


def test_an_amx_cpu_keeps_onednn(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with AMX oneDNN's products run on its tile units: the engine packs for them, not for our kernel."""
    monkeypatch.setattr(cpu_linear, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert "AMX" in (cpu_linear.compiled_linear_unavailable_reason() or "")
    engine = LLMEngine(ServeConfig(model=tiny_model_dir, dtype="bfloat16", device="cpu", kv_cache_gb=0.05))
    assert all(isinstance(lin.base_matmul, PackedLinear) for lin in engine.model.linears())
    assert isinstance(engine.model.logits_matmul, PackedLinear)
    if cpu_linear.kernel_runs_here():  # a benchmark can still put it beside oneDNN's there
        _unpack(engine)
        prepack_bf16(engine.model, batch_hint=32, product="compiled")
        assert all(isinstance(lin.base_matmul, CompiledLinear) for lin in engine.model.linears())


def test_a_cpu_without_avx512_bf16_keeps_onednn(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "kernel_runs_here", lambda: False)
    assert "no AVX-512 BF16" in (cpu_linear.compiled_linear_unavailable_reason() or "")
    engine = LLMEngine(ServeConfig(model=tiny_model_dir, dtype="bfloat16", device="cpu", kv_cache_gb=0.05))
    assert all(isinstance(lin.base_matmul, PackedLinear) for lin in engine.model.linears())
    _unpack(engine)
    prepack_bf16(engine.model, batch_hint=32, product="compiled")  # forced, but it cannot run here: oneDNN's
    assert all(isinstance(lin.base_matmul, PackedLinear) for lin in engine.model.linears())

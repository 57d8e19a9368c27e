"""The compiled element-wise ops of a bf16 step (kernels/cpu_step.py) against their torch specs
(serving/models/step_ops.py): RoPE, the residual add and argmax exactly; RMSNorm and SiLU * up within one bf16 step
on a small share of elements (the sum's order and exp's polynomial differ from torch's); input checks; and the
model with the compiled ops as close to float32 as with torch's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from switchboard.kernels import cpu_step
from switchboard.serving.models import step_ops
from switchboard.serving.models.attention import AttentionMetadata, build_group
from switchboard.serving.models.loader import load_model

pytestmark = pytest.mark.skipif(
    not cpu_step.compiled_step_available(), reason=f"compiled step ops: {cpu_step.compiled_step_unavailable_reason()}"
)
ROWS = [0, 1, 7, 32, 300]  # 300 rows spread over threads


def bf16(*shape: int, scale: float = 1.0, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def assert_within_one_step(got: Tensor, want: Tensor, share: float = 1e-3) -> None:
    """Equal but for at most `share` of the elements, each off by at most one bf16 step (2^-7 relative)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    differ = got != want
    assert int(differ.sum()) <= share * got.numel(), f"{int(differ.sum())} of {got.numel()} elements differ"
    if differ.any():
        g, w = got[differ].float(), want[differ].float()
        assert ((g - w).abs() <= w.abs() * 2**-7 + 1e-30).all(), (g, w)


@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows: int) -> None:
    x, weight = bf16(rows, 576, scale=3.0), bf16(576, seed=1)
    assert_within_one_step(cpu_step.rms_norm(x, weight, 1e-5), step_ops.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_adds_in_place_exactly(rows: int) -> None:
    x, residual, weight = bf16(rows, 576), bf16(rows, 576, scale=10.0, seed=2), bf16(576, seed=1)
    want_normed, want_residual = step_ops.add_rms_norm(x, residual, weight, 1e-6)
    mine = residual.clone()
    normed, out_residual = cpu_step.add_rms_norm(x, mine, weight, 1e-6)
    assert out_residual is mine and torch.equal(mine, want_residual)
    assert_within_one_step(normed, want_normed)


def test_norms_read_rows_of_a_wider_tensor() -> None:
    wide = bf16(16, 700)
    x, weight = wide[:, :576], bf16(576, seed=1)  # a row stride of 700
    assert_within_one_step(cpu_step.rms_norm(x, weight, 1e-5), step_ops.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: exp's range ends (silu of -100 is -0, of 100 is 100)
def test_silu_mul(rows: int, scale: float) -> None:
    gate_up = bf16(rows, 2 * 1536, scale=scale)
    assert_within_one_step(cpu_step.silu_mul(gate_up), step_ops.silu_mul(gate_up))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_rope_equals_torch_in_place(rows: int, heads: int, kv_heads: int, head_dim: int) -> None:
    width = (heads + 2 * kv_heads) * head_dim
    qkv = bf16(rows, width + 16, scale=4.0)[:, :width]  # a packed output's columns: a row stride past the width
    angles = torch.rand(rows, head_dim // 2, generator=torch.Generator().manual_seed(3)) * 50
    cos = torch.cat((angles, angles), dim=-1).cos().bfloat16()
    sin = torch.cat((angles, angles), dim=-1).sin().bfloat16()
    want = step_ops.rope(qkv, cos, sin, heads + kv_heads, head_dim)
    got = cpu_step.rope_(qkv, cos, sin, heads + kv_heads, head_dim)
    assert got is qkv and torch.equal(got, want)  # v's columns untouched


def test_argmax_rows_is_torchs_first_maximum() -> None:
    logits = torch.randn(33, 49_157, generator=torch.Generator().manual_seed(4)) * 20
    logits[1] = 0.0  # all tied: the first
    logits[2, 10] = logits[2, 40_000] = 1e30  # tied at the top: the first
    logits[3, :100] = float("-inf")  # masked tokens
    logits[4, 5] = 3e38
    logits[5] = float("-inf")  # every token masked: 0, as torch answers
    assert torch.equal(cpu_step.argmax_rows(logits), logits.argmax(-1))
    strided = logits[:, :40_000]
    assert torch.equal(cpu_step.argmax_rows(strided), strided.argmax(-1))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cpu_step.rms_norm(torch.zeros(2, 8), torch.zeros(8).bfloat16(), 1e-5), "bfloat16"),
        (lambda: cpu_step.rms_norm(bf16(2, 8), bf16(7), 1e-5), "weight"),
        (lambda: cpu_step.add_rms_norm(bf16(3, 8), bf16(2, 8), bf16(8), 1e-5), "rows"),
        (lambda: cpu_step.silu_mul(bf16(2, 7)), "even"),
        (lambda: cpu_step.rope_(bf16(2, 64), bf16(2, 32), bf16(2, 32), 3, 32), "heads"),
        (lambda: cpu_step.argmax_rows(bf16(2, 8)), "float32"),
    ],
)
def test_bad_operands_are_refused(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


def _logits(model_dir: Path, dtype: torch.dtype, ops: step_ops.StepOps, ids: Tensor) -> Tensor:
    model = load_model(model_dir, dtype, torch.device("cpu"), max_positions=64)
    model.ops = ops
    cfg = model.cfg
    cache = torch.zeros(cfg.num_layers, 2, 65, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    n = len(ids)
    group = build_group(0, [n], [n], [[0, 1, 2, 3]], 16, torch.device("cpu"), pad_slot=64)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), groups=[group])
    with torch.no_grad():
        return model.logits(model(ids, torch.arange(n), cache, meta))


def test_the_model_with_compiled_ops_is_as_close_to_float32_as_with_torchs(tiny_model_dir: Path) -> None:
    ids = torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(5))
    full = _logits(tiny_model_dir, torch.float32, step_ops.TORCH_OPS, ids)
    torch_bf16 = _logits(tiny_model_dir, torch.bfloat16, step_ops.TORCH_OPS, ids)
    compiled_bf16 = _logits(tiny_model_dir, torch.bfloat16, step_ops.compiled_step_ops(), ids)
    torch_error = (torch_bf16 - full).abs().max().item()
    compiled_error = (compiled_bf16 - full).abs().max().item()
    assert 0 < compiled_error <= 1.5 * torch_error, (compiled_error, torch_error)

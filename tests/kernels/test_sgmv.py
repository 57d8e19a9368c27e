"""LoRA shrink / expand / apply: the fast torch path against the float32 reference, and LoRA's own properties."""

from __future__ import annotations

import pytest
import torch

from switchboard.kernels.segments import build_segments
from switchboard.kernels.sgmv import (
    is_k_major,
    lora_apply,
    lora_apply_ref,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    to_k_major,
)

# (rank, in, out, slots, tokens): ranks 1..64, hidden sizes 64 / 512 / 1376, 1 / 4 / 32 adapters
SHAPES = [(1, 64, 512, 1, 16), (8, 512, 64, 4, 24), (16, 1376, 512, 32, 40), (64, 512, 1376, 4, 33)]
SHAPE_IDS = [f"r{r}-in{i}-out{o}-S{s}" for r, i, o, s, _ in SHAPES]
# The torch path's forms: every adapted run its own matmul (SGMV), the default split, every token gathered.
MIN_GEMM_RUNS = {"sgmv": 1, "auto": 8, "gather": 10**9}


def _case(shape, pattern, dtype, make_slots, make_randn):
    r, d_in, d_out, S, T = shape
    slots = make_slots(pattern, T, S)
    T = len(slots)
    x = make_randn(T, d_in, dtype=dtype, seed=1)
    A = make_randn(S, r, d_in, dtype=dtype, scale=d_in**-0.5, seed=2)
    B = make_randn(S, d_out, r, dtype=dtype, scale=r**-0.5, seed=3)
    y = make_randn(T, d_out, dtype=dtype, seed=4)
    return slots, x, A, B, y


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_lora_apply_matches_reference(shape, pattern, dtype, make_slots, make_randn, assert_close) -> None:
    slots, x, A, B, y = _case(shape, pattern, dtype, make_slots, make_randn)
    expected = lora_apply_ref(y.clone(), x, A, B, build_segments(slots))
    for form, min_run in MIN_GEMM_RUNS.items():
        seg = build_segments(slots, min_gemm_run=min_run)
        for layout, (A_, B_) in {"row-major": (A, B), "k-major": (to_k_major(A), to_k_major(B))}.items():
            out = y.clone()
            assert lora_apply(out, x, A_, B_, seg) is out
            assert_close(out, expected, f"{form} form, {layout} slots")


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=SHAPE_IDS[1:3])
def test_shrink_and_expand_match_reference(shape, pattern, dtype, make_slots, make_randn, assert_close) -> None:
    slots, x, A, B, y = _case(shape, pattern, dtype, make_slots, make_randn)
    seg = build_segments(slots, min_gemm_run=8)
    for A_, B_ in ((A, B), (to_k_major(A), to_k_major(B))):
        h = lora_shrink(x, A_, seg)
        assert_close(h, lora_shrink_ref(x, A, seg))
        assert_close(lora_expand(y.clone(), h, B_, seg), lora_expand_ref(y.clone(), h, B, seg))


def test_k_major_layout_is_recognised() -> None:
    A = torch.zeros(4, 8, 32)
    assert not is_k_major(A) and is_k_major(to_k_major(A)) and is_k_major(torch.zeros(4, 32, 8).transpose(1, 2))
    assert is_k_major(torch.zeros(4, 1, 32))  # rank 1: both layouts are the same memory


def test_tokens_without_adapter_are_untouched(make_randn) -> None:
    x, y = make_randn(6, 64, dtype=torch.float32), make_randn(6, 32, dtype=torch.float32, seed=5)
    A, B = make_randn(2, 4, 64, dtype=torch.float32), make_randn(2, 32, 4, dtype=torch.float32)
    for min_run in (1, 100):
        seg = build_segments([-1, 0, 0, -1, 1, -1], min_gemm_run=min_run)
        h = lora_shrink(x, A, seg)
        assert torch.all(h[[0, 3, 5]] == 0)
        out = lora_expand(y.clone(), h, B, seg)
        assert torch.equal(out[[0, 3, 5]], y[[0, 3, 5]])
        assert not torch.equal(out[[1, 2, 4]], y[[1, 2, 4]])


@pytest.mark.parametrize("slots", [[0, 1, 2, 1], [2, 2, 2, 0, 0, -1]], ids=["decode", "prefill"])
@pytest.mark.parametrize("min_run", [1, 100])
def test_output_may_be_a_column_slice_of_a_packed_output(slots, min_run, make_randn, assert_close) -> None:
    """q|k|v packed in one [T, 3*64] output: LoRA on the k part adds in place and leaves q and v alone."""
    seg = build_segments(slots, min_gemm_run=min_run)
    T = len(slots)
    x = make_randn(T, 128, dtype=torch.float32)
    A, B = make_randn(3, 8, 128, dtype=torch.float32, scale=0.1), make_randn(3, 64, 8, dtype=torch.float32)
    for A_, B_ in ((A, B), (to_k_major(A), to_k_major(B))):
        qkv = make_randn(T, 192, dtype=torch.float32, seed=6)
        expected = qkv.clone()
        lora_apply_ref(expected[:, 64:128], x, A, B, seg)
        lora_apply(qkv[:, 64:128], x, A_, B_, seg)
        assert_close(qkv, expected)


def test_each_row_of_a_mixed_batch_equals_its_merged_adapter(make_randn, assert_close) -> None:
    """PEFT's property: unmerged on a mixed batch == x @ (W + B A)^T row by row, with ranks padded to r_max."""
    ranks = [2, 8, 5]  # padded to r_max = 8 with zeros
    A = torch.zeros(3, 8, 96)
    B = torch.zeros(3, 80, 8)
    for s, r in enumerate(ranks):
        A[s, :r] = make_randn(r, 96, dtype=torch.float32, scale=0.1, seed=10 + s)
        B[s, :, :r] = make_randn(80, r, dtype=torch.float32, seed=20 + s)
    slots = [0, 0, 0, 2, 1, -1, 2, 2]
    seg = build_segments(slots, min_gemm_run=3)
    x, W = make_randn(8, 96, dtype=torch.float32), make_randn(80, 96, dtype=torch.float32, seed=7)
    y = lora_apply(x @ W.T, x, A, B, seg)
    for t, s in enumerate(slots):
        merged = W if s == -1 else W + B[s] @ A[s]
        assert_close(y[t], x[t] @ merged.T)

"""KronA: the Kronecker-vector identity, and kron_apply against the reference that builds kron(W1, W2)."""

from __future__ import annotations

import pytest
import torch

from switchboard.kernels.kron import kron_apply_ref
from switchboard.kernels.segments import build_segments

# (o1, i1, o2, i2, slots, tokens): in = i1*i2, out = o1*o2; square and non-square factors, both contraction orders
SHAPES = [(2, 4, 32, 16, 1, 16), (8, 8, 64, 64, 4, 24), (4, 8, 344, 172, 32, 40), (16, 2, 4, 32, 4, 20)]
SHAPE_IDS = [f"W1_{o1}x{i1}-W2_{o2}x{i2}-S{s}" for o1, i1, o2, i2, s, _ in SHAPES]
# The torch path's forms: every adapted run its own product, the default split, every token gathered.
MIN_GEMM_RUNS = {"runs": 1, "auto": 8, "gather": 10**9}


@pytest.mark.parametrize(("o1", "i1", "o2", "i2"), [(3, 5, 4, 2), (2, 7, 6, 3), (4, 4, 4, 4)])
def test_kronecker_vector_identity(o1: int, i1: int, o2: int, i2: int) -> None:
    """kron(W1, W2) @ x == (W1 @ X @ W2^T) flattened row-major, with X = x reshaped row-major to [i1, i2]."""
    gen = torch.Generator().manual_seed(0)
    W1 = torch.randn(o1, i1, generator=gen, dtype=torch.float64)
    W2 = torch.randn(o2, i2, generator=gen, dtype=torch.float64)
    x = torch.randn(i1 * i2, generator=gen, dtype=torch.float64)
    expected = torch.kron(W1, W2) @ x
    torch.testing.assert_close((W1 @ x.reshape(i1, i2) @ W2.T).reshape(o1 * o2), expected)
    # ADAPTERS.md §1.2, row form: x (A ⊗ B) = vec_r(Aᵀ X B) with X = x reshaped to [a1, b1]
    A, B = W1.T, W2.T  # [i1, o1], [i2, o2]
    torch.testing.assert_close((A.T @ x.reshape(i1, i2) @ B).reshape(-1), x @ torch.kron(A, B))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_kron_apply_matches_reference(shape, pattern, dtype, gather_path, make_slots, make_randn, assert_close) -> None:
    o1, i1, o2, i2, S, T = shape
    slots = make_slots(pattern, T, S)
    T = len(slots)
    x = make_randn(T, i1 * i2, dtype=dtype, seed=1)
    W1 = make_randn(S, o1, i1, dtype=dtype, scale=i1**-0.5, seed=2)
    W2 = make_randn(S, o2, i2, dtype=dtype, scale=i2**-0.5, seed=3)
    y = make_randn(T, o1 * o2, dtype=dtype, seed=4)
    expected = kron_apply_ref(y.clone(), x, W1, W2, build_segments(slots))
    for form, min_run in MIN_GEMM_RUNS.items():
        out = y.clone()
        assert gather_path.kron_apply(out, x, W1, W2, build_segments(slots, min_gemm_run=min_run)) is out
        assert_close(out, expected, f"{form} form")


@pytest.mark.parametrize("slots", [[0, 1, -1, 1], [1, 1, 1, -1, 0, 0]], ids=["decode", "prefill"])
@pytest.mark.parametrize("min_run", [1, 100])
def test_output_may_be_a_column_slice_of_a_packed_output(slots, min_run, gather_path, make_randn, assert_close) -> None:
    seg = build_segments(slots, min_gemm_run=min_run)
    T = len(slots)
    x = make_randn(T, 64, dtype=torch.float32)
    W1, W2 = make_randn(2, 4, 8, dtype=torch.float32, scale=0.3), make_randn(2, 8, 8, dtype=torch.float32, scale=0.3)
    packed = make_randn(T, 96, dtype=torch.float32, seed=6)
    expected = packed.clone()
    kron_apply_ref(expected[:, 16:48], x, W1, W2, seg)
    gather_path.kron_apply(packed[:, 16:48], x, W1, W2, seg)
    assert_close(packed, expected)

"""(IA)3 segmented scaling: in place (also on the k/v column slices of a packed q|k|v output) and out of place."""

from __future__ import annotations

import pytest
import torch

from switchboard.kernels.scale import segmented_scale_ref, segmented_scaled
from switchboard.kernels.segments import build_segments


@pytest.mark.parametrize(("n", "S", "T"), [(64, 1, 16), (512, 4, 24), (1376, 32, 40)], ids=["n64", "n512", "n1376"])
def test_segmented_scale_matches_reference(
    n, S, T, pattern, dtype, gather_path, make_slots, make_randn, assert_close
) -> None:
    slots = make_slots(pattern, T, S)
    x = make_randn(len(slots), n, dtype=dtype, seed=1)
    V = (1 + make_randn(S, n, dtype=torch.float32, scale=0.5, seed=2)).to(dtype)
    expected = segmented_scale_ref(x.clone(), V, build_segments(slots))
    for min_run in (1, 8, 10**9):  # every run broadcast, the default split, every token gathered
        seg = build_segments(slots, min_gemm_run=min_run)
        out = x.clone()
        assert gather_path.segmented_scale(out, V, seg) is out
        assert_close(out, expected, f"min_gemm_run={min_run}")
        assert_close(gather_path.segmented_scaled(x, V, seg), expected, f"out of place, min_gemm_run={min_run}")


@pytest.mark.parametrize("slots", [[0, 1, -1, 2], [2, 2, 2, -1, -1, 0], [1, 0, 2, 1]], ids=["decode", "runs", "full"])
@pytest.mark.parametrize("min_run", [1, 100])
def test_scales_k_and_v_slices_of_a_packed_output_in_place(
    slots, min_run, gather_path, make_randn, assert_close
) -> None:
    seg = build_segments(slots, min_gemm_run=min_run)
    T = len(slots)
    qkv = make_randn(T, 64 + 2 * 32, dtype=torch.float32)
    Vk = make_randn(3, 32, dtype=torch.float32, seed=2)
    Vv = make_randn(3, 32, dtype=torch.float32, seed=3)
    expected = qkv.clone()
    segmented_scale_ref(expected[:, 64:96], Vk, seg)
    segmented_scale_ref(expected[:, 96:], Vv, seg)
    gather_path.segmented_scale(qkv[:, 64:96], Vk, seg)
    gather_path.segmented_scale(qkv[:, 96:], Vv, seg)
    assert_close(qkv, expected)


def test_out_of_place_leaves_input_untouched(make_randn) -> None:
    seg = build_segments([0, 0, 1])
    packed = make_randn(3, 16, dtype=torch.float32)
    before = packed.clone()
    out = segmented_scaled(packed[:, 8:], torch.full((2, 8), 3.0), seg)
    assert torch.equal(packed, before)
    assert out.is_contiguous()
    torch.testing.assert_close(out, 3 * before[:, 8:])

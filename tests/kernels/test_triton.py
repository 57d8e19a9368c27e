"""Triton shrink / expand / scale against the float32 reference: on CUDA (`cuda` marker), and on CPU tensors
through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py when no GPU is present). Small sizes only:
the interpreter runs every program instance in Python."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed (it is in the project's test extra)")

from triton.runtime.interpreter import InterpretedFunction

from switchboard.kernels import triton_scale, triton_sgmv
from switchboard.kernels.scale import segmented_scale_ref
from switchboard.kernels.segments import build_segments
from switchboard.kernels.sgmv import lora_apply_ref, lora_shrink_ref, to_k_major

INTERPRETED = isinstance(triton_sgmv._shrink_kernel, InterpretedFunction)

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETED,
            reason="Triton kernels were compiled, not interpreted: TRITON_INTERPRET=1 must be set before "
            "switchboard.kernels.triton_sgmv is first imported to run them on CPU tensors",
        ),
    ),
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rank, in, out, slots, tokens), small: ranks 1 / 16 / 64 (rank tile 16, 16, 64), 1-3 input and output tiles
SHAPES = [(1, 64, 96, 3, 12), (16, 160, 64, 4, 20), (64, 64, 48, 2, 10)]
# Every popularity pattern of conftest.py once, each on one of the shapes (the interpreter is slow), and tiling.
CASES = [
    ("distinct", SHAPES[0]), ("uniform", SHAPES[1]), ("zipf", SHAPES[2]), ("identical", SHAPES[1]),
    ("prefill", SHAPES[0]), ("decode_none", SHAPES[2]), ("single", SHAPES[1]), ("empty", SHAPES[0]),
    ("none", SHAPES[2]), ("identical", (8, 64, 80, 2, 70)), ("uniform", (80, 64, 64, 2, 8)),
]  # fmt: skip  # the last two: two token tiles and two output tiles; a rank past one rank tile
CASE_IDS = [f"{p}-r{r}-in{i}-out{o}" for p, (r, i, o, _, _) in CASES]


def _skip_interpreted_bf16_dot(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584)")


def _lora_case(shape, pattern, dtype, device, make_slots, make_randn):
    r, d_in, d_out, S, T = shape
    seg = build_segments(make_slots(pattern, T, S), device=device)
    T = seg.num_tokens
    x = make_randn(T, d_in, dtype=dtype, seed=1).to(device)
    A = make_randn(S, r, d_in, dtype=dtype, scale=d_in**-0.5, seed=2).to(device)
    B = make_randn(S, d_out, r, dtype=dtype, scale=r**-0.5, seed=3).to(device)
    y = make_randn(T, d_out, dtype=dtype, seed=4).to(device)
    return seg, x, A, B, y


@pytest.mark.parametrize(("pattern", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", DEVICES)
def test_triton_lora_matches_reference(device, dtype, pattern, shape, make_slots, make_randn, assert_close) -> None:
    _skip_interpreted_bf16_dot(device, dtype)
    seg, x, A, B, y = _lora_case(shape, pattern, dtype, device, make_slots, make_randn)
    expected_h, expected = lora_shrink_ref(x, A, seg), lora_apply_ref(y.clone(), x, A, B, seg)
    for layout, (A_, B_) in {"row-major": (A, B), "k-major": (to_k_major(A), to_k_major(B))}.items():
        assert_close(triton_sgmv.triton_lora_shrink(x, A_, seg), expected_h, f"shrink, {layout} slots")
        out = y.clone()
        assert triton_sgmv.triton_lora_apply(out, x, A_, B_, seg) is out
        assert_close(out, expected, f"apply, {layout} slots")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_expand_into_a_column_slice_and_over_an_empty_segment(device, make_randn, assert_close) -> None:
    """A hand-built batch with an empty segment in the middle; y is the k part of a packed q|k|v output."""
    seg = build_segments([0, 0, 1, 1, 1, -1, 2])
    starts, slots = seg.starts.tolist(), seg.slots.tolist()  # [0, 2, 5, 6, 7], [0, 1, -1, 2]
    seg = dataclasses.replace(
        seg, starts=torch.tensor(starts[:2] + starts[1:]), slots=torch.tensor([*slots[:1], 2, *slots[1:]])
    ).to(device)
    x = make_randn(7, 64, dtype=torch.float32, seed=1).to(device)
    A = make_randn(3, 8, 64, dtype=torch.float32, scale=0.125, seed=2).to(device)
    B = make_randn(3, 32, 8, dtype=torch.float32, seed=3).to(device)
    qkv = make_randn(7, 96, dtype=torch.float32, seed=4).to(device)
    expected = qkv.clone()
    lora_apply_ref(expected[:, 32:64], x, A, B, seg)
    triton_sgmv.triton_lora_apply(qkv[:, 32:64], x, A, B, seg)
    assert_close(qkv, expected)


@pytest.mark.parametrize(("pattern", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", DEVICES)
def test_triton_scale_matches_reference(device, dtype, pattern, shape, make_slots, make_randn, assert_close) -> None:
    _, n, _, S, T = shape
    seg = build_segments(make_slots(pattern, T, S), device=device)
    qkv = make_randn(seg.num_tokens, 3 * n, dtype=dtype, seed=1).to(device)
    V = (1 + make_randn(S, n, dtype=torch.float32, scale=0.5, seed=2)).to(dtype).to(device)
    expected = qkv.clone()
    segmented_scale_ref(expected[:, n : 2 * n], V, seg)
    triton_scale.triton_segmented_scale(qkv[:, n : 2 * n], V, seg)  # in place on the k part
    assert_close(qkv, expected)
    assert_close(
        triton_scale.triton_segmented_scaled(qkv[:, :n], V, seg), segmented_scale_ref(qkv[:, :n].clone(), V, seg)
    )


def test_layout_is_checked_before_launch() -> None:
    seg = build_segments([0, 1])
    x, A = torch.zeros(2, 32), torch.zeros(2, 4, 32)
    with pytest.raises(ValueError, match="shapes"):
        triton_sgmv.triton_lora_shrink(x, torch.zeros(2, 4, 16), seg)
    with pytest.raises(ValueError, match="tokens"):
        triton_sgmv.triton_lora_shrink(x, A, build_segments([0, 1, 1]))
    with pytest.raises(ValueError, match="expected"):
        triton_sgmv.triton_lora_shrink(x, A.double(), seg)
    with pytest.raises(ValueError, match="overlaps"):
        triton_scale.triton_segmented_scale(torch.zeros(1, 32).expand(2, 32), torch.zeros(2, 32), seg)
    with pytest.raises(ValueError, match="overlaps"):
        triton_sgmv.triton_lora_expand(torch.zeros(1, 8).expand(2, 8), torch.zeros(2, 4), torch.zeros(2, 8, 4), seg)


@pytest.mark.parametrize("pattern", ["uniform", "prefill", "decode_none"])
@pytest.mark.parametrize("device", DEVICES)
def test_triton_backend_packed_linear_matches_reference(device, pattern, make_slots, make_randn, assert_close) -> None:
    """The TRITON backend's `lora_packed` (one shrink for q|k|v, an expand per part) against the reference."""
    from switchboard.kernels import sgmv
    from switchboard.kernels.backend import Backend, get_kernels

    r, d_in, widths, S = 8, 64, (64, 32, 32), 3
    seg = build_segments(make_slots(pattern, 12, S), device=device)
    x = make_randn(seg.num_tokens, d_in, dtype=torch.float32, seed=1).to(device)
    A = make_randn(S, len(widths) * r, d_in, dtype=torch.float32, scale=d_in**-0.5, seed=2).to(device)
    parts, col = [], 0
    for p, w in enumerate(widths):
        parts.append((make_randn(S, w, r, dtype=torch.float32, scale=r**-0.5, seed=3 + p).to(device), col, p * r))
        col += w
    y = make_randn(seg.num_tokens, col, dtype=torch.float32, seed=9).to(device)
    lora = sgmv.pack_lora(A, parts)
    expected = sgmv.lora_packed_ref(y.clone(), x, lora, seg)
    out = y.clone()
    assert get_kernels(Backend.TRITON).lora_packed(out, x, lora, seg) is out
    assert_close(out, expected)

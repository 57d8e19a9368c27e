"""The AVX-512 BF16 linear (kernels/cpu_linear.py) against the float32 product rounded to bf16: every output within
one bf16 step of it and nearly all equal, over row counts that take every register block, tail tile and pass over
the weight; a bias; rows of a wider tensor; a row's output independent of the batch around it; refused operands; and
a chain of products as close to float32's as oneDNN's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from switchboard.kernels import cpu_linear

pytestmark = pytest.mark.skipif(
    not cpu_linear.compiled_linear_available(),
    reason=f"compiled bf16 linear: {cpu_linear.compiled_linear_unavailable_reason()}",
)

# 1-9: a partial register block of 8 rows, then one and a bit; 300 and 600: past a pass of 256 rows.
ROWS = [0, 1, 7, 8, 9, 32, 33, 300, 600]
# (out, in): the real model's products (q|k|v, down, gate|up), a tail tile of 16 columns (112 = 48 + 48 + 16), 32,
# and the smallest shape the kernel takes.
SHAPES = [(960, 576), (576, 1536), (3072, 576), (112, 64), (32, 96), (16, 2)]


def bf16(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def assert_rounded_float32(got: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> None:
    """got is the exact product (+ bias) rounded to bf16, within float32 summation's error: at most one bf16 step
    from it plus K float32 roundings of the sum of |terms| (a sum that cancels to near zero keeps the error of its
    terms), and nearly every element equal to it."""
    exact = x.double() @ w.double().T + (0.0 if b is None else b.double())
    want = exact.bfloat16()
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    differ = got != want
    assert int(differ.sum()) <= max(2, 2e-3 * got.numel()), f"{int(differ.sum())} of {got.numel()} differ"
    terms = x.double().abs() @ w.double().abs().T + (0.0 if b is None else b.double().abs())
    allowed = want.double().abs() * 2**-7 + terms * x.shape[1] * 2**-24
    assert ((got.double() - exact).abs() <= allowed).all()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_product_is_the_float32_product_rounded(rows: int, out_features: int, in_features: int, with_bias: bool):
    w = bf16(out_features, in_features, seed=out_features, scale=in_features**-0.5)
    x = bf16(rows, in_features, seed=rows)
    b = bf16(out_features, seed=1) if with_bias else None
    got = cpu_linear.linear(x, cpu_linear.pack(w), b, out_features)
    assert_rounded_float32(got, x, w, b)


def test_reads_rows_of_a_wider_tensor() -> None:
    wide = bf16(40, 700, seed=2)
    x, w = wide[:, :576], bf16(960, 576, seed=3, scale=576**-0.5)  # a row stride of 700
    assert_rounded_float32(cpu_linear.linear(x, cpu_linear.pack(w), None, 960), x, w, None)


def test_packs_a_non_contiguous_weight() -> None:
    w = bf16(576, 96, seed=4).t()  # [96, 576], transposed
    x = bf16(5, 576, seed=5)
    assert_rounded_float32(cpu_linear.linear(x, cpu_linear.pack(w), None, 96), x, w, None)


def test_large_values_keep_their_magnitude() -> None:
    """bf16's range is float32's: sums in float32 of large products neither overflow nor lose their exponent."""
    w, x = bf16(48, 64, seed=6, scale=1e15), bf16(3, 64, seed=7, scale=1e15)
    assert_rounded_float32(cpu_linear.linear(x, cpu_linear.pack(w), None, 48), x, w, None)


def test_a_rows_output_does_not_depend_on_the_batch() -> None:
    """Each row's sums run over K in one order whatever block, pass or thread takes it: a token's product is the same
    bits alone, in a decode batch or in a prefill chunk (oneDNN's blocking gives no such promise)."""
    w, b = bf16(960, 576, seed=11, scale=576**-0.5), bf16(960, seed=12)
    x = bf16(600, 576, seed=13)
    packed = cpu_linear.pack(w)
    whole = cpu_linear.linear(x, packed, b, 960)
    for start, stop in [(0, 1), (5, 6), (299, 300), (3, 35), (250, 600)]:
        assert torch.equal(cpu_linear.linear(x[start:stop], packed, b, 960), whole[start:stop])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cpu_linear.pack(bf16(24, 64, seed=0)), "multiple of 16"),
        (lambda: cpu_linear.pack(bf16(32, 63, seed=0)), "even"),
        (lambda: cpu_linear.pack(torch.zeros(32, 64)), "bfloat16"),
        (lambda: cpu_linear.linear(torch.zeros(2, 64), cpu_linear.pack(bf16(32, 64, seed=0)), None, 32), "bfloat16"),
        (lambda: cpu_linear.linear(bf16(64, 2, seed=0).t(), cpu_linear.pack(bf16(32, 64, seed=0)), None, 32), "rows"),
        (lambda: cpu_linear.linear(bf16(2, 64, seed=0), cpu_linear.pack(bf16(32, 64, seed=0)), None, 48), "packed"),
        (lambda: cpu_linear.linear(bf16(2, 62, seed=0), cpu_linear.pack(bf16(32, 64, seed=0)), None, 32), "packed"),
        (
            lambda: cpu_linear.linear(bf16(2, 64, seed=0), cpu_linear.pack(bf16(32, 64, seed=0)), bf16(16, seed=0), 32),
            "bias",
        ),
    ],
)
def test_bad_operands_are_refused(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


def test_as_close_to_float32_as_onednn() -> None:
    """Over a chain of the real model's products (each rounded to bf16), the kernel drifts from float32 no more than
    oneDNN's F.linear does."""
    ws = [bf16(576, 576, seed=10 + i, scale=576**-0.5) for i in range(8)]
    x0 = bf16(32, 576, seed=9)
    exact, ours, onednn = x0.float(), x0, x0
    for w in ws:
        exact = F.linear(exact, w.float())
        ours = cpu_linear.linear(ours, cpu_linear.pack(w), None, 576)
        onednn = F.linear(onednn, w)
    err_ours = (ours.float() - exact).abs().max().item()
    err_onednn = (onednn.float() - exact).abs().max().item()
    assert err_ours <= 1.5 * err_onednn, (err_ours, err_onednn)

"""The base product of a bf16 model on an AVX-512 BF16 CPU: `y = x W^T (+ b)` over a weight packed once.

oneDNN's bf16 product (what `F.linear` and the pre-packed `mkldnn._linear_pointwise` run) reaches 220-350 GFLOP/s
on the real model's shapes at a decode step's 32 rows on the two Zen 4 cores we measure on, with the weights streamed
from memory as they are in a step (a 135M-parameter model's 270 MB never fit the caches); this one reaches 310-400,
1.14-1.41x faster per shape (`python -m switchboard.bench.prepack --products`; the cores' bf16 peak is about 450).
Decode steps are most of a serving run's products: in the engine, W runs 1.10x faster than on oneDNN packed once.

How: the weight is packed once into tiles of 48 output columns, each pair of input columns' weights side by side
(`pack`), so that one VDPBF16PS multiplies a broadcast pair of x's values by 16 columns' pairs, exactly, summing in
float32. A block of 8 rows by 48 columns keeps its 24 accumulators in registers over all of K; the weight is one
forward stream per tile, read once from memory per 256 rows of x, and the next tile is prefetched while one computes.
Threads split the tiles.

What it computes: each output is the float32 sum of x's row times W's row (+ bias), rounded to bf16 to nearest even,
as torch's bf16 product does; only the order of the float32 sums differs from oneDNN's (so an output can differ by
one bf16 step, and greedy text on a near-tie can flip, as with any other kernel). That order is the same for every
row whatever the batch around it, so a token's product is the same bits alone, in a decode batch or in a prefill
chunk. VDPBF16PS treats subnormal inputs as zero. tests/kernels/test_cpu_linear.py compares it with the float32 product.

Built with the other CPU kernels (`cpp_build`, -march=native); `compiled_linear_available()` is False where the
build fails or the CPU lacks AVX-512 BF16, and serving/models/prepack.py keeps oneDNN there. It is False on a CPU with
AMX too (Intel Sapphire Rapids and later): oneDNN's products run on its tile units there, with several times the
VDPBF16PS peak this kernel is bound by (not measured here: no such CPU on our machines). A weight's shape must
have a multiple of 16 rows and an even number of columns (`shape_supported`): every Llama-family model's does.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .cpp_build import build_ops, cpu_flags, read_source


def shape_supported(out_features: int, in_features: int) -> bool:
    return out_features > 0 and out_features % 16 == 0 and in_features > 0 and in_features % 2 == 0


def pack(weight: Tensor) -> Tensor:
    """weight [N, K] bf16 -> the packed copy `linear` reads (flat, N * K values)."""
    return torch.ops.switchboard.pack_bf16_linear(weight)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """x [M, K] bf16 (rows contiguous) times the packed weight, + bias [N] bf16 -> [M, N] bf16."""
    return torch.ops.switchboard.bf16_linear(x, packed, bias, out_features)


def compiled_linear_available() -> bool:
    """Whether the kernel is built here and the CPU runs it (compiles it on the first call, a few seconds)."""
    return compiled_linear_unavailable_reason() is None


def compiled_linear_unavailable_reason() -> str | None:
    """None when the kernel runs here, else why not: the build's failure, a CPU without AVX-512 BF16, or one with
    AMX."""
    reason = compiled_linear_build_failure()
    if reason is None and not kernel_runs_here():
        return "this CPU (or compiler) has no AVX-512 BF16; oneDNN's product runs instead"
    if reason is None and has_amx(cpu_flags()):
        return "this CPU has AMX, on which oneDNN's bf16 product is faster; it runs instead"
    return reason


def kernel_runs_here() -> bool:
    """Whether the kernel is built and this CPU can run it, whether or not the engine would choose it (benchmarks
    compare it with oneDNN on an AMX CPU too)."""
    return compiled_linear_build_failure() is None and torch.ops.switchboard.bf16_linear_supported()


def has_amx(flags: frozenset[str] | set[str]) -> bool:
    return "amx_bf16" in flags


@functools.cache
def compiled_linear_build_failure() -> str | None:
    """None once the library is built and loaded (it builds on every CPU; only AVX-512 BF16 ones run the product)."""
    return build_ops("cpu_linear", read_source("cpu_linear"))

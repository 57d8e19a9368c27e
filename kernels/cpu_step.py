"""The element-wise work of a bf16 decoder step on the CPU, one C++ call each: RMSNorm (with the residual add),
SiLU(gate) * up, RoPE on q and k, and the greedy argmax of the logits.

At decode sizes (32 tokens of a 576-wide model) each of these is a few microseconds of arithmetic, but torch runs
them as chains of small ops: an RMSNorm in float32 is seven (a cast, pow, mean, add, rsqrt, mul, cast back) plus the
weight's mul, RoPE is a slice, neg, cat, two muls and an add per tensor. Each op pays its dispatch and a pass over
memory; on the real model, 30 layers of them were about a sixth of a step. Each op here is one call and one pass.

Each computes what its torch spec (`switchboard.serving.models.step_ops`) computes in bf16: every element-wise product
and sum in float32, rounded to bf16 where torch rounds. RoPE, SiLU * up (but for exp) and the residual add are those
roundings exactly; RMSNorm sums its squares in another order, and SiLU's exp is a polynomial (relative error about
2e-7), so an element may differ from torch's by one bf16 step, rarely (tests/kernels/test_cpu_step.py bounds it).
float32 models keep the torch ops: they are the reference path, compared with transformers and PEFT to 1e-4.

`argmax_rows` scans each row twice (its maximum, then the first index holding it): torch's CPU argmax tracks an
index per element: in the engine's profile 0.73 ms a step on 32 rows of a 49k vocabulary, this 0.09 ms.

Built on first use like the other CPU kernels (`cpp_build`); where it cannot be built, `compiled_step_available` is
False and the engine keeps the torch ops.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .cpp_build import build_ops, read_source


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each row of x [T, n] (bf16, contiguous rows) with weight [n] (bf16): a new [T, n] tensor."""
    return torch.ops.switchboard.rms_norm(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """residual += x in place (bf16), then its RMSNorm: returns (normed, residual)."""
    return torch.ops.switchboard.add_rms_norm(x, residual, weight, eps), residual


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [T, 2 I] (gate | up, bf16) -> SiLU(gate) * up [T, I]."""
    return torch.ops.switchboard.silu_mul(gate_up)


def rope_(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, head_dim: int) -> Tensor:
    """Rotate-half RoPE on the first `heads` heads of each row of qkv [T, >= heads * head_dim] (bf16), in place;
    cos, sin: [T, head_dim] bf16. Returns qkv."""
    torch.ops.switchboard.rope_(qkv, cos, sin, heads, head_dim)
    return qkv


def argmax_rows(logits: Tensor) -> Tensor:
    """The first index of each row's maximum: [N, V] float32 -> [N] int64. Rows must be finite (a row holding a NaN
    answers an index, not the NaN's)."""
    return torch.ops.switchboard.argmax_rows(logits)


def compiled_step_available() -> bool:
    """Whether the C++ ops are built and loaded here (compiles them on the first call, a few seconds)."""
    return _built() is None


def compiled_step_unavailable_reason() -> str | None:
    return _built()


@functools.cache
def _built() -> str | None:
    return build_ops("cpu_step", read_source("cpu_step"))

"""The element-wise work between a decoder layer's products: RMSNorm (with the residual add), SiLU(gate) * up, RoPE.

`TORCH_OPS` is the model's math in torch ops, as transformers computes it: the reference, what float32 models and
every device but the CPU run. `compiled_step_ops()` gives the same math as one C++ call per op
(`switchboard.kernels.cpu_step`), for bf16 models on the CPU. The engine picks one set once (`LlamaModel.ops`); the
model never branches on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from switchboard.kernels import cpu_step

from .rope import apply_rope


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in float32, as transformers does, then scale in the model's dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual stream's next value, residual + x, and its RMSNorm: returns (normed, new residual)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def silu_mul(gate_up: Tensor) -> Tensor:
    """SwiGLU's activation on a packed gate|up product [T, 2 I] -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, head_dim: int) -> Tensor:
    """qkv [T, ...] with RoPE applied to its first `heads` heads (q's and then k's); cos, sin: [T, head_dim] in
    qkv's dtype. May rotate in place (the compiled op does); returns the rotated tensor."""
    rotated = apply_rope(qkv[:, : heads * head_dim].view(-1, heads, head_dim), cos[:, None, :], sin[:, None, :])
    return torch.cat((rotated.flatten(1), qkv[:, heads * head_dim :]), dim=-1)


@dataclass(frozen=True, slots=True)
class StepOps:
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    silu_mul: Callable[[Tensor], Tensor]
    rope: Callable[[Tensor, Tensor, Tensor, int, int], Tensor]


TORCH_OPS = StepOps(rms_norm, add_rms_norm, silu_mul, rope)


def compiled_step_ops_apply(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `compiled_step_ops` serves a model of this dtype on this device: bf16 on the CPU, where the ops build."""
    return dtype == torch.bfloat16 and device.type == "cpu" and cpu_step.compiled_step_available()


def compiled_step_ops() -> StepOps:
    return StepOps(cpu_step.rms_norm, cpu_step.add_rms_norm, cpu_step.silu_mul, cpu_step.rope_)

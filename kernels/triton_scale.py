"""Triton (IA)3 segmented scaling: one program per (token, column tile), reading its slot's vector in place.

Unlike the torch gather form it never materialises a [T, n] copy of the gathered vectors. Imported only through
`backend.py`'s guarded loader (or by tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .segments import Segments


@triton.jit
def _scale_kernel(x_ptr, v_ptr, slots_ptr, n, stride_xt, stride_xn, stride_vs, stride_vn, BLOCK_N: tl.constexpr):
    # x[t, j] *= V[slot(t), j]
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n
    x_ptrs = x_ptr + t * stride_xt + offs * stride_xn
    x = tl.load(x_ptrs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + slot * stride_vs + offs * stride_vn, mask=mask).to(tl.float32)
    tl.store(x_ptrs, (x * v).to(x_ptr.dtype.element_ty), mask=mask)


def triton_segmented_scale(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """Triton `segmented_scale`, in place on x.

    Semantics:
        for t in range(T):
            if seg.token_slots[t] != -1:
                x[t] *= V[seg.token_slots[t]]

    Args:
        x: [T, n] activations, updated in place (a column slice of a packed output is fine).
        V: [S, n] stacked scaling vectors, same dtype and device as x.
        seg: the step's segments, tensors on x's device; slots must be < S (not checked: it would synchronise).
    Returns:
        x.
    """
    if x.dim() != 2 or V.dim() != 2 or V.shape[1] != x.shape[1]:
        raise ValueError(f"shapes: x {tuple(x.shape)} must be [T, n], V {tuple(V.shape)} must be [S, n]")
    if seg.num_tokens != x.shape[0]:
        raise ValueError(f"segments describe {seg.num_tokens} tokens, x has {x.shape[0]}")
    if seg.token_slots.device != x.device or V.device != x.device or V.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}, {x.device}), V ({V.dtype}, {V.device}) and the segments must agree")
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape, strict=True)):
        raise ValueError(f"x overlaps itself (strides {x.stride()}): the kernel writes it in place")
    if seg.num_adapted == 0 or x.shape[1] == 0:
        return x
    block_n = min(1024, triton.next_power_of_2(x.shape[1]))
    grid = (x.shape[0], triton.cdiv(x.shape[1], block_n))
    _scale_kernel[grid](
        x, V, seg.token_slots, x.shape[1], x.stride(0), x.stride(1), V.stride(0), V.stride(1), BLOCK_N=block_n
    )
    return x


def triton_segmented_scaled(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """Out-of-place `triton_segmented_scale`: a new contiguous [T, n] tensor, x untouched.

    Semantics:
        out = x.clone(); triton_segmented_scale(out, V, seg); return out
    """
    return triton_segmented_scale(x.clone(memory_format=torch.contiguous_format), V, seg)

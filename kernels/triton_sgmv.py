"""Triton LoRA shrink and expand over segments (SGMV): one program per (segment, token tile, output tile).

Imported only through `backend.py`'s guarded loader (or by tests), so that `switchboard.kernels` needs Triton
nowhere else. Ranks are padded in the kernel, not in memory: the rank tile is a power of two >= 16 (what `tl.dot`
needs) and lanes past r_max are masked to zero. Accumulation is float32; float32 inputs use IEEE dot products
(no TF32) so that they match the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .segments import Segments


@triton.jit
def _segment_tile(starts_ptr, slots_ptr, BLOCK_M: tl.constexpr):
    # This program's token tile of segment program_id(0): (slot, token rows, their mask, whether the tile is past
    # the segment's end).
    g = tl.program_id(0)
    slot = tl.load(slots_ptr + g)
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    m0 = start + tl.program_id(1) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # token rows (int64)
    return slot, offs_m, offs_m < end, m0 >= end


@triton.jit
def _masked_dot(
    lhs_ptrs, rhs_ptrs, mask_rows, mask_cols, offs_i, inner, lhs_step, rhs_step,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_I: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # sum over the inner dimension of lhs [rows, inner] @ rhs [inner, cols], BLOCK_I at a time, in float32; lanes
    # past `inner` (and masked rows and columns) read as zero.
    acc = tl.full((BLOCK_ROWS, BLOCK_COLS), 0.0, dtype=tl.float32)
    for i0 in range(0, inner, BLOCK_I):
        mask_i = offs_i < inner - i0
        lt = tl.load(lhs_ptrs, mask=mask_rows[:, None] & mask_i[None, :], other=0.0)
        rt = tl.load(rhs_ptrs, mask=mask_i[:, None] & mask_cols[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(lt, rt, input_precision="ieee")
        else:
            acc += tl.dot(lt, rt)
        lhs_ptrs += lhs_step
        rhs_ptrs += rhs_step
    return acc


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, starts_ptr, slots_ptr,
    in_features, rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ht,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # h[t, r] = sum_k x[t, k] * A[slot, r, k] for the tokens t of segment g (h is contiguous: allocated on launch)
    slot, offs_m, mask_m, past_end = _segment_tile(starts_ptr, slots_ptr, BLOCK_M)
    if slot < 0:
        return
    if past_end:
        return
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < rank
    x_ptrs = x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    a_ptrs = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # [BLOCK_K, BLOCK_R]
    acc = _masked_dot(
        x_ptrs, a_ptrs, mask_m, mask_r, offs_k, in_features, BLOCK_K * stride_xk, BLOCK_K * stride_ak,
        BLOCK_M, BLOCK_R, BLOCK_K, IEEE,
    )  # fmt: skip
    h_ptrs = h_ptr + offs_m[:, None] * stride_ht + offs_r[None, :]
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, y_ptr, starts_ptr, slots_ptr,
    out_features, rank,
    stride_ht, stride_hr, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # y[t, n] += sum_r h[t, r] * B[slot, n, r] for the tokens t of segment g
    slot, offs_m, mask_m, past_end = _segment_tile(starts_ptr, slots_ptr, BLOCK_M)
    if slot < 0:
        return
    if past_end:
        return
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < out_features
    h_ptrs = h_ptr + offs_m[:, None] * stride_ht + offs_r[None, :] * stride_hr  # [BLOCK_M, BLOCK_R]
    b_ptrs = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br  # [BLOCK_R, BLOCK_N]
    acc = _masked_dot(
        h_ptrs, b_ptrs, mask_m, mask_n, offs_r, rank, BLOCK_R * stride_hr, BLOCK_R * stride_br,
        BLOCK_M, BLOCK_N, BLOCK_R, IEEE,
    )  # fmt: skip
    y_ptrs = y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _pow2_tile(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _check(seg: Segments, num_tokens: int, device: torch.device, dtype: torch.dtype, **tensors: Tensor) -> None:
    """Layout checks before a launch: one device and dtype, segments that match, no self-overlapping output.

    Any strides are accepted otherwise (column slices of packed outputs, k-major slots)."""
    if seg.num_tokens != num_tokens:
        raise ValueError(f"segments describe {seg.num_tokens} tokens, the activations have {num_tokens}")
    if seg.starts.device != device or seg.slots.device != device:
        raise ValueError(f"segments live on {seg.starts.device}, the tensors on {device}: use Segments.to()")
    if seg.starts.dtype != torch.int64 or seg.slots.dtype != torch.int64:
        raise ValueError("segment starts and slots must be int64")
    for name, t in tensors.items():
        if t.device != device or t.dtype != dtype:
            raise ValueError(f"{name}: {t.dtype} on {t.device}, expected {dtype} on {device}")
    out = tensors.get("y")
    if out is not None and any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape, strict=True)):
        raise ValueError(f"y overlaps itself (strides {out.stride()}): the kernel writes it in place")


def triton_lora_shrink(x: Tensor, A: Tensor, seg: Segments) -> Tensor:
    """Triton `lora_shrink`.

    Semantics:
        for t in range(T):
            h[t] = A[seg.token_slots[t]] @ x[t] if seg.token_slots[t] != -1 else 0

    Args:
        x: [T, in] activations (any strides).
        A: [S, r_max, in] stacked down-projections, row-major or k-major, same dtype and device as x.
        seg: the step's segments, tensors on x's device; slots must be < S (not checked: it would synchronise).
    Returns:
        h: [T, r_max] in x's dtype; rows of tokens without an adapter are zero.
    """
    if x.dim() != 2 or A.dim() != 3 or A.shape[2] != x.shape[1]:
        raise ValueError(f"shapes: x {tuple(x.shape)} must be [T, in], A {tuple(A.shape)} must be [S, r, in]")
    _check(seg, x.shape[0], x.device, x.dtype, x=x, A=A)
    rank = A.shape[1]
    new = torch.zeros if seg.has_unadapted else torch.empty
    h = new(x.shape[0], rank, dtype=x.dtype, device=x.device)  # [T, r_max]
    if seg.num_adapted == 0:
        return h
    block_m = _pow2_tile(seg.max_segment_len, 16, 64)
    block_r = _pow2_tile(rank, 16, 64)
    grid = (seg.slots.numel(), triton.cdiv(seg.max_segment_len, block_m), triton.cdiv(rank, block_r))
    _shrink_kernel[grid](
        x, A, h, seg.starts, seg.slots,
        x.shape[1], rank,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), h.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64, IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    return h


def triton_lora_expand(y: Tensor, h: Tensor, B: Tensor, seg: Segments) -> Tensor:
    """Triton `lora_expand`, in place on y.

    Semantics:
        for t in range(T):
            if seg.token_slots[t] != -1:
                y[t] += B[seg.token_slots[t]] @ h[t]

    Args:
        y: [T, out] output, updated in place (a column slice of a packed output is fine).
        h: [T, r_max] shrunk activations, same dtype as y.
        B: [S, out, r_max] stacked up-projections, scale folded in, row-major or k-major.
        seg: the step's segments, tensors on y's device; slots must be < S (not checked).
    Returns:
        y.
    """
    if y.dim() != 2 or h.dim() != 2 or B.dim() != 3 or B.shape[1:] != (y.shape[1], h.shape[1]):
        raise ValueError(
            f"shapes: y {tuple(y.shape)} must be [T, out], h {tuple(h.shape)} [T, r], B {tuple(B.shape)} [S, out, r]"
        )
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"h has {h.shape[0]} rows, y {y.shape[0]}")
    _check(seg, y.shape[0], y.device, y.dtype, y=y, h=h, B=B)
    if seg.num_adapted == 0:
        return y
    rank = h.shape[1]
    block_m = _pow2_tile(seg.max_segment_len, 16, 64)
    block_n = 64
    block_r = _pow2_tile(rank, 16, 64)
    grid = (seg.slots.numel(), triton.cdiv(seg.max_segment_len, block_m), triton.cdiv(y.shape[1], block_n))
    _expand_kernel[grid](
        h, B, y, seg.starts, seg.slots,
        y.shape[1], rank,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=y.dtype == torch.float32,
    )  # fmt: skip
    return y


def triton_lora_apply(y: Tensor, x: Tensor, A: Tensor, B: Tensor, seg: Segments) -> Tensor:
    """Triton `lora_apply`: `triton_lora_expand(y, triton_lora_shrink(x, A, seg), B, seg)`.

    Semantics:
        for t in range(T):
            if seg.token_slots[t] != -1:
                y[t] += B[seg.token_slots[t]] @ (A[seg.token_slots[t]] @ x[t])

    Args: as `triton_lora_shrink` and `triton_lora_expand`; y: [T, out], x: [T, in], A: [S, r, in], B: [S, out, r].
    Returns:
        y.
    """
    return triton_lora_expand(y, triton_lora_shrink(x, A, seg), B, seg)

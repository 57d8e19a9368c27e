"""LoRA over a mixed batch: segmented shrink (h = x A^T) and expand (y += h B^T), one adapter slot per token.

Slots are stacked: `A: [S, r_max, in]`, `B: [S, out, r_max]`, ranks zero-padded up to r_max, the LoRA scale
already folded into B. The `_ref` functions are the spec and the test oracle (a float32 loop over tokens).

The fast torch path never copies adapter weights per token. Long runs (prefill chunks) get one matmul each on the
slot's weights in place (SGMV). All other tokens (decode tokens, short runs) are done at once in a gather form
whose shape depends on how the slots are laid out in memory:

- k-major slots (A stored as [S, in, r], B as [S, r, out], passed as their transposed views so the shapes above
  hold): an embedding bag, each token summing the weight rows its activations select, straight from the slot
  tensors: no copies, two calls whatever the number of adapters (the fastest form on CPU, see bench.py);
- row-major slots: tokens grouped by slot into a padded [U, width] batch and one bmm over the U distinct slots,
  copying only those U slots' weights (none when they are exactly slots 0..U-1).

Allocate slots k-major for decode speed: `torch.empty(S, in, r).transpose(1, 2)` and
`torch.empty(S, r, out).transpose(1, 2)`. Measured (bench.py: 32 decode tokens, r 16, in = out = 512, bf16, 2
threads): k-major 40 us for 1, 4 or 32 distinct adapters, about the base linear x @ W.T (38 us); row-major 47 /
67 / 90 us; per-token copies of A and B then bmm 88-93 us; one matmul per slot 160 us (4) to 1.3 ms (32), as a
small bf16 matmul costs ~20 us on this CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import bf16_codec, cpu_adapters
from .segments import NO_SLOT, Gather, Segments


def lora_shrink_ref(x: Tensor, A: Tensor, seg: Segments) -> Tensor:
    """Reference for `lora_shrink`: a float32 loop over tokens."""
    h = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    for t, s in enumerate(seg.token_slots.tolist()):
        if s != NO_SLOT:
            h[t] = A[s].float() @ x[t].float()
    return h.to(x.dtype)


def lora_expand_ref(y: Tensor, h: Tensor, B: Tensor, seg: Segments) -> Tensor:
    """Reference for `lora_expand`: a float32 loop over tokens, in place on y."""
    for t, s in enumerate(seg.token_slots.tolist()):
        if s != NO_SLOT:
            y[t] = (y[t].float() + B[s].float() @ h[t].float()).to(y.dtype)
    return y


def lora_apply_ref(y: Tensor, x: Tensor, A: Tensor, B: Tensor, seg: Segments) -> Tensor:
    """Reference for `lora_apply`: shrink and expand in float32 with no rounding in between, in place on y."""
    for t, s in enumerate(seg.token_slots.tolist()):
        if s != NO_SLOT:
            y[t] = (y[t].float() + B[s].float() @ (A[s].float() @ x[t].float())).to(y.dtype)
    return y


def is_k_major(W: Tensor) -> bool:
    """W [S, m, k] is the transposed view of a contiguous [S, k, m] tensor (the embedding-bag layout)."""
    return W.transpose(1, 2).is_contiguous()


def to_k_major(W: Tensor) -> Tensor:
    """The same values as W [S, m, k], laid out k-major: the transposed view of a contiguous [S, k, m] copy."""
    return W.transpose(1, 2).contiguous().transpose(1, 2)


def _grouped(W: Tensor, g: Gather) -> Tensor:
    """The distinct slots' weights, [U, ...]: a view when they are slots 0..U-1, else a copy of U slots."""
    return W[: g.distinct.numel()] if g.all_slots else W.index_select(0, g.distinct)


def _shrink_bags(xg: Tensor, A: Tensor, g: Gather) -> Tensor:
    # h[t] = sum_k x[t, k] * A^T[slot(t), k, :]: bag t reads rows slot*in + k of A^T viewed as [S*in, r]
    S, r, d_in = A.shape
    index = g.bag_indices(d_in).view(-1, d_in)  # [N, in]
    return F.embedding_bag(index, A.transpose(1, 2).reshape(S * d_in, r), mode="sum", per_sample_weights=xg)


def _shrink_padded(xg: Tensor, A: Tensor, g: Gather) -> Tensor:
    return g.unpadded(torch.bmm(g.padded(xg), _grouped(A, g).transpose(1, 2)))  # [U, width, r] -> [N, r]


def _expand_bags(hg: Tensor, B: Tensor, g: Gather) -> Tensor:
    # delta[t] = sum_j h[t, j] * B^T[slot(t), j, :]: bag t reads rows slot*r + j of B^T viewed as [S*r, out]
    S, d_out, r = B.shape
    index = g.bag_indices(r).view(-1, r)  # [N, r]
    return F.embedding_bag(index, B.transpose(1, 2).reshape(S * r, d_out), mode="sum", per_sample_weights=hg)


def _expand_padded(hg: Tensor, B: Tensor, g: Gather) -> Tensor:
    return g.unpadded(torch.bmm(g.padded(hg), _grouped(B, g).transpose(1, 2)))  # [U, width, out] -> [N, out]


# Gather form by slot layout (is_k_major): (rows [N, n], weights, gather) -> [N, m]
_SHRINK_GATHERED = {True: _shrink_bags, False: _shrink_padded}
_EXPAND_GATHERED = {True: _expand_bags, False: _expand_padded}


def lora_shrink(x: Tensor, A: Tensor, seg: Segments) -> Tensor:
    """Project every token onto its adapter's down-projection.

    Semantics:
        for t in range(T):
            h[t] = A[seg.token_slots[t]] @ x[t] if seg.token_slots[t] != -1 else 0

    Args:
        x: [T, in] activations.
        A: [S, r_max, in] stacked down-projections (ranks zero-padded to r_max); row-major, or k-major (the
            transposed view of a contiguous [S, in, r_max]) for the fastest decode path.
        seg: the step's segments (T tokens).
    Returns:
        h: [T, r_max] in x's dtype; rows of tokens without an adapter are zero.
    """
    g, shrink = seg.gather, _SHRINK_GATHERED[is_k_major(A)]
    if g.covers_all and g.num_tokens:
        h = shrink(x, A, g)  # [T, r_max]
    else:
        new = torch.zeros if seg.has_unadapted else torch.empty
        h = new(x.shape[0], A.shape[1], dtype=x.dtype, device=x.device)  # [T, r_max]
        if g.num_tokens:
            h.index_copy_(0, g.rows, shrink(x.index_select(0, g.rows), A, g))
    for start, end, slot in seg.long_runs:
        torch.mm(x[start:end], A[slot].t(), out=h[start:end])
    return h


def lora_expand(y: Tensor, h: Tensor, B: Tensor, seg: Segments) -> Tensor:
    """Add every token's up-projection to y, in place.

    Semantics:
        for t in range(T):
            if seg.token_slots[t] != -1:
                y[t] += B[seg.token_slots[t]] @ h[t]

    Args:
        y: [T, out] output, updated in place; may be a strided column slice of a wider packed output (q|k|v).
        h: [T, r_max] shrunk activations (from `lora_shrink`).
        B: [S, out, r_max] stacked up-projections, scale folded in; row-major, or k-major (the transposed view of
            a contiguous [S, r_max, out]) for the fastest decode path.
        seg: the step's segments (T tokens).
    Returns:
        y.
    """
    g, expand = seg.gather, _EXPAND_GATHERED[is_k_major(B)]
    if g.covers_all and g.num_tokens:
        y.add_(expand(h, B, g))
    elif g.num_tokens:
        y.index_add_(0, g.rows, expand(h.index_select(0, g.rows), B, g))
    for start, end, slot in seg.long_runs:
        y[start:end].addmm_(h[start:end], B[slot].t())
    return y


def lora_apply(y: Tensor, x: Tensor, A: Tensor, B: Tensor, seg: Segments) -> Tensor:
    """Add every token's LoRA delta to y, in place: `lora_expand(y, lora_shrink(x, A, seg), B, seg)`.

    Semantics:
        for t in range(T):
            if seg.token_slots[t] != -1:
                y[t] += B[seg.token_slots[t]] @ (A[seg.token_slots[t]] @ x[t])

    Args:
        y: [T, out] output, updated in place (a strided column slice is fine).
        x: [T, in] activations.
        A: [S, r_max, in] stacked down-projections (row-major or k-major, see `lora_shrink`).
        B: [S, out, r_max] stacked up-projections, scale folded in (row-major or k-major, see `lora_expand`).
        seg: the step's segments (T tokens).
    Returns:
        y.
    """
    return lora_expand(y, lora_shrink(x, A, seg), B, seg)


PackedPart = tuple[Tensor, int, int]  # (B [S, out, r_max], first column of the part in y, first row of its h)


@dataclass(frozen=True, slots=True)
class CompiledLora:
    """The compiled CPU op's operands for one packed linear (`cpu_adapters.lora_packed_gather_lists`), derived once
    by `pack_lora`."""

    a_storage: Tensor  # [S, in, W]: A's k-major storage
    b_storages: list[Tensor]  # per part, [S, r, out]
    cols: list[int]  # per part, its first column in y
    rows: list[int]  # per part, its first row of h
    rank: int  # r, the padded rank of every part
    # bf16 slots coded in 12 bits a weight (`bf16_codec`), A's stack and then each B's, for the op to stream; empty
    # where coding is off or does not pay here.
    coded: list[Tensor]


@dataclass(frozen=True, slots=True)
class PackedLora:
    """One packed linear's LoRA stacks (q|k|v, gate|up) as `lora_packed` takes them. Build it with `pack_lora`
    when the stacks change (the slot cache does, per linear), not per call: a decode step calls `lora_packed` for
    every linear, and deriving the compiled op's operands each time cost as much as the op's own call."""

    A: Tensor  # [S, W, in], every part's rows (W = parts x r_max)
    parts: tuple[PackedPart, ...]
    compiled: CompiledLora | None  # where the compiled CPU op takes these stacks (k-major, on the CPU, built here)

    def recode(self, slot: int) -> None:
        """Code `slot` again after its raw weights changed (the slot cache calls it on every load)."""
        if self.compiled is not None and self.compiled.coded:
            raws = [self.compiled.a_storage, *self.compiled.b_storages]
            for raw, rows in zip(raws, self.compiled.coded, strict=True):
                bf16_codec.encode_slots(raw[slot : slot + 1], rows[slot : slot + 1])


def pack_lora(A: Tensor, parts: Sequence[PackedPart], code_slots: bool = True) -> PackedLora:
    """`A` and its parts, with the compiled op's operands derived once (see `PackedLora`); `code_slots`: keep coded
    copies of bf16 stacks for the op where that pays here (`cpu_adapters.coded_slots_pay`)."""
    A_storage = A.transpose(1, 2)  # k-major slots: these are the contiguous [S, in, W] and [S, r, out]
    storages = [B.transpose(1, 2) for B, _, _ in parts]
    compiled = None
    if parts and cpu_adapters.applies((), (A_storage, *storages)):
        cols, rows = [col for _, col, _ in parts], [row for _, _, row in parts]
        coded = []
        if code_slots and A.dtype == torch.bfloat16 and cpu_adapters.coded_slots_pay():
            coded = [bf16_codec.coded_stack(raw) for raw in [A_storage, *storages]]
        compiled = CompiledLora(A_storage, storages, cols, rows, parts[0][0].shape[2], coded)
    return PackedLora(A, tuple(parts), compiled)


def lora_packed_ref(y: Tensor, x: Tensor, lora: PackedLora, seg: Segments) -> Tensor:
    """Reference for `lora_packed`: a float32 loop over tokens, h never rounded, in place on y."""
    for t, s in enumerate(seg.token_slots.tolist()):
        if s != NO_SLOT:
            h = lora.A[s].float() @ x[t].float()  # [W]
            for B, col, row in lora.parts:
                out, r = B.shape[1], B.shape[2]
                y[t, col : col + out] = (y[t, col : col + out].float() + B[s].float() @ h[row : row + r]).to(y.dtype)
    return y


def lora_packed(y: Tensor, x: Tensor, lora: PackedLora, seg: Segments) -> Tensor:
    """LoRA on a packed linear (q|k|v, gate|up): one shrink for every part, then each part's expand, in place.

    Semantics:
        for t in range(T):
            if (s := seg.token_slots[t]) != -1:
                h = lora.A[s] @ x[t]                              # [W]: every part's rows at once
                for B, col, row in lora.parts:
                    y[t, col : col + out] += B[s] @ h[row : row + r]

    The gathered tokens go to `lora_shrink` and `lora_expand` (the compiled CPU backend, `cpu_backend`, sends them to
    one C++ call for the shrink and every expand instead); long runs take one matmul per run and part on the slot's
    weights in place.

    Args:
        y: [T, out_total] packed output, updated in place.
        x: [T, in] activations.
        lora: from `pack_lora(A, parts)`: A [S, W, in] stacked down-projections of every part (W = parts x r_max),
            row-major or k-major; per part (B [S, out, r_max] with the scale folded in, first column in y, first
            row in W).
        seg: the step's segments (T tokens).
    Returns:
        y.
    """
    if seg.gather.num_tokens:
        lora_packed_gathered(y, x, lora, seg)
    return lora_packed_long_runs(y, x, lora, seg)


def lora_packed_gathered(y: Tensor, x: Tensor, lora: PackedLora, seg: Segments) -> Tensor:
    """`lora_packed` for the gathered tokens of `seg` (not its long runs), in place on y."""
    gathered = _gather_only(seg)
    h = lora_shrink(x, lora.A, gathered)
    for B, col, row in lora.parts:
        lora_expand(y[:, col : col + B.shape[1]], h[:, row : row + B.shape[2]], B, gathered)
    return y


def lora_packed_long_runs(y: Tensor, x: Tensor, lora: PackedLora, seg: Segments) -> Tensor:
    """`lora_packed` for the long runs of `seg`: one matmul per run and part, in place on y."""
    for start, end, slot in seg.long_runs:
        h = x[start:end] @ lora.A[slot].t()  # [n, W]
        for B, col, row in lora.parts:
            y[start:end, col : col + B.shape[1]].addmm_(h[:, row : row + B.shape[2]], B[slot].t())
    return y


def _gather_only(seg: Segments) -> Segments:
    """`seg` without its long runs (the caller does them)."""
    return seg if not seg.long_runs else replace(seg, long_runs=())

"""(IA)3 over a mixed batch: each token's activations scaled element-wise by its adapter's vector.

Slots are stacked: `V: [S, n]`. Used on the k and v column slices of a packed q|k|v output (in place on a strided
view) and on the input of down_proj. Tokens without an adapter (slot -1) are left as they are. Long runs multiply
by their slot's vector broadcast over the run; the other tokens multiply by their gathered vectors at once (a
vector is no larger than the activation row it scales, so the gather costs what one more read of x costs). The
compiled CPU backend (`cpu_backend`) scales those tokens in one C++ call instead (no index_select / index_copy round
trip when only some tokens carry an (IA)3 adapter, as in a batch mixing kinds).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .segments import NO_SLOT, Gather, Segments


def segmented_scale_ref(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """Reference for `segmented_scale`: a float32 loop over tokens, in place on x."""
    for t, s in enumerate(seg.token_slots.tolist()):
        if s != NO_SLOT:
            x[t] = (x[t].float() * V[s].float()).to(x.dtype)
    return x


def segmented_scale(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """Scale every token's row by its adapter's vector, in place.

    Semantics:
        for t in range(T):
            if seg.token_slots[t] != -1:
                x[t] *= V[seg.token_slots[t]]

    Args:
        x: [T, n] activations, updated in place; may be a strided column slice (the k or v part of q|k|v).
        V: [S, n] stacked scaling vectors.
        seg: the step's segments (T tokens).
    Returns:
        x.
    """
    if seg.gather.num_tokens:
        scale_gathered(x, V, seg.gather)
    return scale_long_runs(x, V, seg)


def scale_gathered(x: Tensor, V: Tensor, g: Gather) -> Tensor:
    """`segmented_scale` for the gathered tokens of `g` (at least one), in place on x."""
    if g.covers_all:
        return x.mul_(V.index_select(0, g.slots))  # [T, n]: one gathered vector per token
    return x.index_copy_(0, g.rows, x.index_select(0, g.rows).mul_(V.index_select(0, g.slots)))


def scale_long_runs(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """`segmented_scale` for the long runs of `seg`, in place on x."""
    for start, end, slot in seg.long_runs:
        x[start:end].mul_(V[slot])  # one vector broadcast over the run's rows: no copies
    return x


def segmented_scaled(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """Out-of-place `segmented_scale`: returns a new contiguous [T, n] tensor and leaves x untouched.

    Semantics:
        out = x.clone(); segmented_scale(out, V, seg); return out

    Args:
        x: [T, n] activations (any strides).
        V: [S, n] stacked scaling vectors.
        seg: the step's segments (T tokens).
    Returns:
        out: [T, n], contiguous.
    """
    return segmented_scale(x.clone(memory_format=torch.contiguous_format), V, seg)

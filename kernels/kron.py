"""KronA over a mixed batch: y += x (W1 (x) W2)^T per token, without ever building the Kronecker product.

Slots are stacked in nn.Linear layout: `W1: [S, o1, i1]`, `W2: [S, o2, i2]`, delta_W[s] = kron(W1[s], W2[s]) of
shape [o1*o2, i1*i2], the scale folded into W1. With x[t] reshaped row-major to X [i1, i2] (ADAPTERS.md §1.2,
column form):

    kron(W1, W2) @ x[t] == (W1 @ X @ W2^T).reshape(o1 * o2)        (row-major flatten)

Tokens sharing a slot are done at once with two batched matmuls, in whichever order costs fewer multiply-adds
(W2 first: n*i1*o2*(i2 + o1), W1 first: n*o1*i2*(i1 + o2)); activations are permuted between them, weights never
copied per token. Long runs get one such product each; the other tokens are grouped by slot into a padded
[U, width] batch over the U distinct slots (copying those slots' factors unless they are exactly 0..U-1). The
compiled CPU backend (`cpu_backend`) sends those tokens to a C++ op instead and keeps the long runs here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .segments import NO_SLOT, Gather, Segments


def kron_apply_ref(y: Tensor, x: Tensor, W1: Tensor, W2: Tensor, seg: Segments) -> Tensor:
    """Reference for `kron_apply`: a float32 loop over tokens with the Kronecker product built explicitly."""
    deltas: dict[int, Tensor] = {}  # slot -> kron(W1, W2): [o1*o2, i1*i2], built once per slot
    for t, s in enumerate(seg.token_slots.tolist()):
        if s != NO_SLOT:
            if s not in deltas:
                deltas[s] = torch.kron(W1[s].float(), W2[s].float())
            y[t] = (y[t].float() + deltas[s] @ x[t].float()).to(y.dtype)
    return y


def _kron_grouped(X: Tensor, W1: Tensor, W2: Tensor) -> Tensor:
    """W1[u] @ X[u, c] @ W2[u]^T for every (u, c): X [U, w, i1, i2], W1 [U, o1, i1], W2 [U, o2, i2] -> [U, w, o1*o2]."""
    U, w, i1, i2 = X.shape
    o1, o2 = W1.shape[1], W2.shape[1]
    if i1 * o2 * (i2 + o1) <= o1 * i2 * (i1 + o2):  # W2 first
        Z = torch.bmm(X.reshape(U, w * i1, i2), W2.transpose(1, 2))  # [U, w*i1, o2]
        Z = Z.view(U, w, i1, o2).transpose(1, 2).reshape(U, i1, w * o2)  # [U, i1, w*o2]
        Y = torch.bmm(W1, Z).view(U, o1, w, o2).transpose(1, 2)  # [U, w, o1, o2]
    else:  # W1 first
        P = torch.bmm(W1, X.transpose(1, 2).reshape(U, i1, w * i2))  # [U, o1, w*i2]
        P = P.view(U, o1, w, i2).transpose(1, 2).reshape(U, w * o1, i2)  # [U, w*o1, i2]
        Y = torch.bmm(P, W2.transpose(1, 2))  # [U, w*o1, o2]
    return Y.reshape(U, w, o1 * o2)


def _kron_gathered(xg: Tensor, W1: Tensor, W2: Tensor, g: Gather) -> Tensor:
    """The gathered tokens' deltas: xg [N, in] -> [N, out], grouped by slot into a padded [U, width] batch."""
    U, i1, i2 = g.distinct.numel(), W1.shape[2], W2.shape[2]
    X = g.padded(xg).view(U, g.width, i1, i2)
    W1g, W2g = (W1[:U], W2[:U]) if g.all_slots else (W1.index_select(0, g.distinct), W2.index_select(0, g.distinct))
    return g.unpadded(_kron_grouped(X, W1g, W2g))  # [U, width, out] -> [N, out]


def kron_apply(y: Tensor, x: Tensor, W1: Tensor, W2: Tensor, seg: Segments) -> Tensor:
    """Add every token's Kronecker delta to y, in place.

    Semantics:
        for t in range(T):
            s = seg.token_slots[t]
            if s != -1:
                y[t] += torch.kron(W1[s], W2[s]) @ x[t]
                # computed as (W1[s] @ x[t].reshape(i1, i2) @ W2[s].T).reshape(o1 * o2)

    Args:
        y: [T, out] output, out = o1*o2, updated in place (a strided column slice is fine).
        x: [T, in] activations, in = i1*i2.
        W1: [S, o1, i1] stacked first factors, scale folded in.
        W2: [S, o2, i2] stacked second factors.
        seg: the step's segments (T tokens).
    Returns:
        y.
    """
    if seg.gather.num_tokens:
        kron_gathered(y, x, W1, W2, seg.gather)
    return kron_long_runs(y, x, W1, W2, seg)


def kron_gathered(y: Tensor, x: Tensor, W1: Tensor, W2: Tensor, g: Gather) -> Tensor:
    """`kron_apply` for the gathered tokens of `g` (at least one), in place on y."""
    if g.covers_all:
        return y.add_(_kron_gathered(x, W1, W2, g))
    return y.index_add_(0, g.rows, _kron_gathered(x.index_select(0, g.rows), W1, W2, g))


def kron_long_runs(y: Tensor, x: Tensor, W1: Tensor, W2: Tensor, seg: Segments) -> Tensor:
    """`kron_apply` for the long runs of `seg`: one grouped product per run, in place on y."""
    i1, i2 = W1.shape[2], W2.shape[2]
    for start, end, slot in seg.long_runs:
        X = x[start:end].reshape(1, end - start, i1, i2)
        y[start:end] += _kron_grouped(X, W1[slot : slot + 1], W2[slot : slot + 1])[0]
    return y

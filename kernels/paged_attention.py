"""Paged decode attention on the CPU: each sequence's one query attends to its context, read in place from the cache.

The torch path gathers every sequence's context out of the paged cache (`index_select` -> [B, L, KV, D]) before
attending, so the context is read, written and read again. The C++ kernel here reads each cached row once where it
lies: one task per sequence (threads take tasks off a shared counter, so ragged contexts balance), its keys in one
pass for all heads (a slot's row of KV * D elements is contiguous, and a block's rows follow one another), a
max-subtracted softmax in float32, then its values in a second pass. It is compiled on first use with
`torch.utils.cpp_extension.load_inline` from kernels/csrc/paged_attention.cpp (a C++ compiler and ninja; about
10 s on two cores) into ~/.cache/switchboard/torch_extensions/, keyed by a hash of the source, flags, torch version
and CPU, so later processes load it at once. Where it cannot be built, `paged_decode_attention` runs the reference
after one warning.

- paged_decode_attention_ref: the spec, the fallback and the test oracle (gather + float32 softmax)
- paged_decode_attention: the compiled kernel (CPU tensors), or the reference
- paged_prefill_attention: the same kernel for a prefill chunk's queries, each attending to its sequence's cache up
  to its own position (the bf16 engine's prefill on the CPU, where SDPA in float32 took 4 ms a layer for 32 prompts
  of 64 tokens)
- compiled_paged_attention_available, compiled_paged_attention_unavailable_reason: whether the kernel is built
  here, and if not why (both build it on the first call)

Its micro-benchmark: `python -m switchboard.bench.paged_attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .cpp_build import build_ops, read_source


def paged_decode_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ctx_lens: Tensor, scale: float
) -> Tensor:
    """Reference for `paged_decode_attention`: gathers each context out of the cache, softmax in float32.

    Semantics:
        G = H // KV  # query heads per kv head
        for b in range(B):
            ctx = slots[b, : ctx_lens[b]]
            for h in range(H):
                k = k_cache[ctx, h // G].float()  # [n, D]
                v = v_cache[ctx, h // G].float()
                p = softmax(scale * (k @ q[b, h].float()))  # [n], max-subtracted, float32
                out[b, h] = (p @ v).to(q.dtype)

    Args:
        q: [B, H, D] one query per sequence (any float dtype).
        k_cache, v_cache: [num_slots, KV, D] the layer's cache (float32, bfloat16 or float16), H a multiple of KV.
        slots: [B, L] int64 cache slot of each context position; any valid slot beyond ctx_lens[b].
        ctx_lens: [B] int64 context length of each sequence, 1 <= ctx_lens[b] <= L.
        scale: softmax scale (head_dim ** -0.5).
    Returns:
        out: [B, H, D] in q's dtype.
    """
    B, L = slots.shape
    H, KV, D = q.shape[1], k_cache.shape[1], q.shape[2]
    k = k_cache.index_select(0, slots.flatten()).view(B, L, KV, D).float()
    v = v_cache.index_select(0, slots.flatten()).view(B, L, KV, D).float()
    qg = q.float().view(B, KV, H // KV, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale  # [B, KV, G, L]
    past_end = torch.arange(L, device=slots.device)[None, :] >= ctx_lens[:, None]  # [B, L]
    scores = scores.masked_fill(past_end[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", scores.softmax(dim=-1), v)
    return out.reshape(B, H, D).to(q.dtype)


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ctx_lens: Tensor, scale: float
) -> Tensor:
    """Decode attention reading the context in place from the paged cache: the compiled kernel on CPU tensors.

    Semantics and arguments: those of `paged_decode_attention_ref`, which runs instead (after one warning) where the
    kernel cannot be built. The kernel computes in float32 whatever the dtypes, and checks shapes, dtypes and that
    every slot in use is in range; it raises on tensors off the CPU.
    """
    return _implementation()(q, k_cache, v_cache, slots, ctx_lens, scale)


def paged_prefill_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, ctx_lens: Tensor, seq_of: Tensor, scale: float
) -> Tensor:
    """Attention for N queries that share sequences: query i attends to the first ctx_lens[i] slots of row
    seq_of[i] of `slots` [S, L] (a prefill's query at cache position p has ctx_lens p + 1: causal). Otherwise the
    arguments and semantics of `paged_decode_attention`, which is this with seq_of = arange(N); the compiled kernel,
    or the reference on the gathered rows where it cannot be built."""
    built = _built()
    if isinstance(built, str):
        return paged_decode_attention_ref(q, k_cache, v_cache, slots[seq_of], ctx_lens, scale)
    return torch.ops.switchboard.paged_prefill_attention(q, k_cache, v_cache, slots, ctx_lens, seq_of, scale)


def compiled_paged_attention_available() -> bool:
    """Whether the C++ kernel is built and loaded here (compiles it on the first call, about 10 s)."""
    return not isinstance(_built(), str)


def compiled_paged_attention_unavailable_reason() -> str | None:
    """None when the C++ kernel is loaded, else why it cannot be built (builds it on the first call)."""
    built = _built()
    return built if isinstance(built, str) else None


@functools.cache
def _built() -> Callable[..., Tensor] | str:
    reason = build_ops("paged_attention", read_source("paged_attention"))
    return reason if reason is not None else torch.ops.switchboard.paged_decode_attention


@functools.cache
def _implementation() -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]:
    built = _built()
    return paged_decode_attention_ref if isinstance(built, str) else built

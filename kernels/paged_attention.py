"""Paged decode attention on the CPU: each sequence's one query attends to its context, read in place from the cache.

The torch path gathers every sequence's context out of the paged cache (`index_select` -> [B, L, KV, D]) before
attending, so the context is read, written and read again. The C++ kernel here reads each cached row once where it
lies: one task per sequence (threads take tasks off a shared counter, so ragged contexts balance), its keys in one
pass for all heads (a slot's row of KV * D elements is contiguous, and a block's rows follow one another), a
max-subtracted softmax in float32, then its values in a second pass. It is compiled on first use with
`torch.utils.cpp_extension.load_inline` (a C++ compiler and ninja; about 10 s on two cores) into
~/.cache/switchboard/torch_extensions/, keyed by a hash of the source, flags, torch version and CPU, so later
processes load it at once. Where it cannot be built, `paged_decode_attention` runs the reference after one warning.

- paged_decode_attention_ref: the spec, the fallback and the test oracle (gather + float32 softmax)
- paged_decode_attention: the compiled kernel (CPU tensors), or the reference
- compiled_paged_attention_available, compiled_paged_attention_unavailable_reason: whether the kernel is built
  here, and if not why (both build it on the first call)
- `python -m switchboard.kernels.paged_attention`: micro-benchmark against the reference and the serving path
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def _serving_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The torch serving path the kernel replaces: gather the context, upcast to float32, one SDPA call."""
    B, L = slots.shape
    k = k_cache.index_select(0, slots.flatten()).view(B, L, *k_cache.shape[1:]).float()  # [B, L, KV, D]
    v = v_cache.index_select(0, slots.flatten()).view(B, L, *v_cache.shape[1:]).float()
    o = F.scaled_dot_product_attention(
        q.float()[:, :, None],  # [B, H, 1, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,  # [B, 1, 1, L]
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[2],
    )
    return o[:, :, 0].to(q.dtype)


def _best_median_us(fns: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Per function, the best over interleaved rounds of the median time of one call (us), each round >= 0.1 s."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            times: list[float] = []
            start = time.perf_counter()
            while time.perf_counter() - start < 0.1 or len(times) < 10:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], sorted(times)[len(times) // 2] * 1e6)
    return best


def _time_case(q: Tensor, caches: list[Tensor], slots: Tensor, lens: Tensor, compiled: bool) -> dict[str, float]:
    """Median us per call of each path; call i reads layer cache i mod len(caches), as a decode step does (the
    context is not left in the CPU's caches by the call before)."""
    calls = iter(range(1 << 62))
    mask = (torch.arange(slots.shape[1])[None, :] < lens[:, None])[:, None, None]  # [B, 1, 1, L]
    scale = q.shape[2] ** -0.5

    def layer() -> Tensor:
        return caches[next(calls) % len(caches)]

    fns: dict[str, Callable[[], object]] = {
        "reference": lambda: paged_decode_attention_ref(q, *layer(), slots, lens, scale),
        "serving": lambda: _serving_decode(q, *layer(), slots, mask, scale),
    }
    if compiled:
        fns["compiled"] = lambda: paged_decode_attention(q, *layer(), slots, lens, scale)
    return _best_median_us(fns)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Micro-benchmark of paged decode attention (one call = one layer).")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=8, help="layer caches the calls cycle through")
    p.add_argument("--q-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, H, KV, D, bs = args.batch, args.heads, args.kv_heads, args.head_dim, args.block_size
    start = time.perf_counter()
    reason = compiled_paged_attention_unavailable_reason()
    print(f"compiled kernel: {'loaded' if reason is None else 'UNAVAILABLE'} in {time.perf_counter() - start:.1f} s")
    print(
        f"B={B} H={H} KV={KV} D={D} block={bs} q {args.q_dtype}, {args.layers} layer caches cycled, "
        f"{args.threads} threads; median us per call"
    )
    print(f"{'cache':>9} {'L':>4} {'reference':>10} {'serving':>9} {'compiled':>9} {'serving/compiled':>17}")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=gen).to(getattr(torch, args.q_dtype))
    for dtype in (torch.float32, torch.bfloat16):
        for L in (64, 96, 128):
            per_seq = -(-L // bs)
            blocks = 2 * B * per_seq  # half the pool in use, the blocks scattered over it
            caches = [torch.randn(2, blocks * bs, KV, D, generator=gen).to(dtype) for _ in range(args.layers)]
            tables = torch.randperm(blocks, generator=gen)[: B * per_seq].view(B, per_seq)
            pos = torch.arange(L)
            slots = tables[:, pos // bs] * bs + pos % bs  # [B, L]
            us = _time_case(q, caches, slots, torch.full((B,), L), compiled=reason is None)
            c = us.get("compiled", float("nan"))
            name = str(dtype).removeprefix("torch.")
            print(
                f"{name:>9} {L:>4} {us['reference']:>10.0f} {us['serving']:>9.0f} {c:>9.0f} {us['serving'] / c:>16.2f}x"
            )


if __name__ == "__main__":
    main()

"""Micro-benchmark of paged decode attention (one call = one layer): `python -m switchboard.bench.paged_attention`.

The compiled kernel (`switchboard.kernels.paged_attention`) beside its reference and the torch serving path it
replaces (gather the context, upcast to float32, one SDPA call), on scattered cache blocks, cycling through layer
caches as a decode step does.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from switchboard.kernels.paged_attention import (
    compiled_paged_attention_unavailable_reason,
    paged_decode_attention,
    paged_decode_attention_ref,
)

from .timing import best_median_us


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
    return best_median_us(fns)


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

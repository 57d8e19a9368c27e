"""A 16-bit model's prefill on the CPU goes to the paged kernel (serving/models/attention.py): through the step's
metadata it must attend as the SDPA path does, for fresh prompts and for a later chunk of a longer one."""

from __future__ import annotations

import pytest
import torch

from switchboard.serving.models.attention import (
    AttentionMetadata,
    KVCache,
    _decodes_in_place,
    build_group,
    paged_attention,
)

CPU = torch.device("cpu")


def test_a_bf16_prefill_through_the_kernel_matches_sdpa_in_float32() -> None:
    if not _decodes_in_place(CPU):
        pytest.skip("the compiled paged attention kernel is not built here")
    gen = torch.Generator().manual_seed(0)
    H, KV, D, bs = 6, 2, 64, 16
    cache = KVCache(1, 8, bs, KV, D, torch.bfloat16, CPU)
    # a later chunk (the last 12 of 40 positions: 28 already cached), a 7-token prompt, a 23-token prompt
    ctx_lens, q_lens, tables = [40, 7, 23], [12, 7, 23], [[0, 4, 2], [5], [7, 3]]
    pairs = list(zip(tables, ctx_lens, q_lens, strict=True))
    earlier = [t[p // bs] * bs + p % bs for t, c, n in pairs for p in range(c - n)]
    cache.data[0, :, earlier] = torch.randn(2, len(earlier), KV, D, generator=gen).to(torch.bfloat16)
    step = [t[p // bs] * bs + p % bs for t, c, n in pairs for p in range(c - n, c)]
    T = len(step)
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(T, KV, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    group = build_group(0, q_lens, ctx_lens, tables, bs, CPU, cache.pad_slot)
    meta = AttentionMetadata(slot_mapping=torch.tensor(step), groups=[group])
    assert group.token_ctx is not None and group.token_ctx.tolist()[:2] == [29, 30]  # causal: position + 1
    out = paged_attention(q, k, v, cache.data[0].clone(), meta, D**-0.5)  # bf16: the kernel
    ref = paged_attention(q.float(), k.float(), v.float(), cache.data[0].float(), meta, D**-0.5)  # SDPA, float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)

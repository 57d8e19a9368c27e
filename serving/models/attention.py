"""Paged attention: the KV cache, the per-step attention metadata, and the attention itself.

The cache is a pool of fixed-size blocks; a sequence's keys and values live in the blocks its block table names.
Each step's tokens are flattened into one batch ordered decodes first (one token per sequence), then prefill
chunks. On the CPU, decodes attend with the compiled kernel of `switchboard.kernels.paged_attention`, which reads
their context in place; elsewhere (or where it cannot be built) in one batched SDPA call over their gathered
context. Prefill chunks attend in a second SDPA call, padded to the longest chunk; on the CPU a 16-bit model's
prefill goes to the same kernel, one query at a time (each to its own causal length), faster there than gathering
the context and running SDPA in float32. float32 models keep SDPA: theirs is the path compared with transformers and
PEFT. Everything index-shaped is built once per step (`AttentionMetadata`) and shared by all layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from switchboard.kernels.paged_attention import (
    compiled_paged_attention_available,
    paged_decode_attention,
    paged_prefill_attention,
)


class KVCache:
    """Keys and values of every layer: [layers, 2, num_blocks * block_size + 1, kv_heads, head_dim].

    The last slot (`pad_slot`) belongs to no block and stays zero: padded attention reads it for every position past
    a context's end, so that no query ever reads, even masked, another sequence's keys and values or stale ones left
    in a reused block (a masked position still multiplies its value by 0, and 0 * inf is NaN).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_slot = num_blocks * block_size
        self.data = torch.zeros(
            num_layers, 2, num_blocks * block_size + 1, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


@dataclass(slots=True)
class AttentionGroup:
    """Queries of several sequences, padded into one SDPA call.

    q_index:   [B, Q] rows of the group's tokens (relative to the group's first token) feeding each query slot
    kv_slots:  [B, L] cache slots holding each sequence's context, padded with the cache's zero `pad_slot`
    ctx_lens:  [B] context length of each sequence (its queries included)
    mask:      [B, 1, Q, L] True where a query may attend
    out_index: [n] flat indices into [B * Q] of the real (unpadded) queries, in token order
    token_ctx: [n] each real query's context length (its cache position + 1), in token order
    token_seq: [n] each real query's sequence (row of kv_slots), in token order
    """

    start: int  # first token of the group in the flattened batch
    num_tokens: int
    q_index: torch.Tensor
    kv_slots: torch.Tensor
    ctx_lens: torch.Tensor
    mask: torch.Tensor
    out_index: torch.Tensor | None  # None when there is no padding (decode: Q == 1)
    token_ctx: torch.Tensor | None = None  # None for decodes (ctx_lens is theirs)
    token_seq: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each token's key and value are written to
    groups: list[AttentionGroup]


def build_group(
    start: int,
    q_lens: list[int],
    ctx_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    pad_slot: int,
) -> AttentionGroup:
    """Metadata for sequences whose last `q_lens[i]` of `ctx_lens[i]` cache positions are this step's queries;
    positions past a context's end read `pad_slot`."""
    q_max, ctx_max = max(q_lens), max(ctx_lens)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long)
    pos = torch.arange(ctx_max)
    ctx_t = torch.tensor(ctx_lens)
    kv_slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    kv_slots = torch.where(pos[None, :] < ctx_t[:, None], kv_slots, pad_slot)
    q_len_t = torch.tensor(q_lens)
    qi = torch.arange(q_max)
    q_valid = qi[None, :] < q_len_t[:, None]  # [B, Q]
    q_pos = ctx_t[:, None] - q_len_t[:, None] + qi[None, :]  # cache position of each query
    q_pos = torch.where(q_valid, q_pos, torch.zeros_like(q_pos))  # padded queries attend to position 0 only
    mask = pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]; causal, and hides padding past ctx_len
    first = torch.tensor([0, *q_lens[:-1]]).cumsum(0)
    q_index = torch.where(q_valid, first[:, None] + qi[None, :], torch.zeros_like(q_pos))
    out_index = None if q_max == 1 else torch.nonzero(q_valid.flatten(), as_tuple=True)[0]
    token_ctx = token_seq = None
    if q_max > 1:
        token_ctx = (q_pos + 1)[q_valid].to(device)
        token_seq = torch.arange(len(q_lens))[:, None].expand_as(q_pos)[q_valid].to(device)
    return AttentionGroup(
        start=start,
        num_tokens=sum(q_lens),
        q_index=q_index.to(device),
        kv_slots=kv_slots.to(device),
        ctx_lens=ctx_t.to(device),
        mask=mask[:, None].to(device),
        out_index=None if out_index is None else out_index.to(device),
        token_ctx=token_ctx,
        token_seq=token_seq,
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's keys and values into the cache, then attend.

    q: [T, H, D]; k, v: [T, KV, D]; cache: [2, slots, KV, D] (one layer). Returns [T, H, D].
    """
    cache[0].index_copy_(0, meta.slot_mapping, k.to(cache.dtype))
    cache[1].index_copy_(0, meta.slot_mapping, v.to(cache.dtype))
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = q.new_empty(q.shape)
    for g in meta.groups:
        if g.out_index is None and _decodes_in_place(cache.device):
            # Decode (one query per sequence) on the CPU: the compiled kernel reads the context where it lies.
            q_d = q[g.start : g.start + g.num_tokens]  # [B, H, D]
            out[g.start : g.start + g.num_tokens] = paged_decode_attention(
                q_d, cache[0], cache[1], g.kv_slots, g.ctx_lens, scale
            )
            continue
        if g.token_ctx is not None and q.dtype != torch.float32 and _decodes_in_place(cache.device):
            # A 16-bit model's prefill on the CPU: each query in the kernel, up to its own position.
            assert g.token_seq is not None
            out[g.start : g.start + g.num_tokens] = paged_prefill_attention(
                q[g.start : g.start + g.num_tokens], cache[0], cache[1], g.kv_slots, g.token_ctx, g.token_seq, scale
            )
            continue
        q_g = q[g.start : g.start + g.num_tokens][g.q_index]  # [B, Q, H, D]
        batch, ctx = g.kv_slots.shape
        # index_select on flat slots is several times faster than advanced indexing with a 2-D index on CPU.
        k_g = cache[0].index_select(0, g.kv_slots.flatten()).view(batch, ctx, *cache.shape[2:])  # [B, L, KV, D]
        v_g = cache[1].index_select(0, g.kv_slots.flatten()).view(batch, ctx, *cache.shape[2:])
        if q_g.dtype != k_g.dtype or (q.dtype != torch.float32 and (g.out_index is None or q.device.type == "cpu")):
            # Decode (one query per sequence): SDPA's CPU kernel is 2-3x faster in float32 than in bf16/fp16 at
            # these sizes, and the upcast of the gathered context costs less than the difference. On the CPU
            # prefill computes in float32 too, as the decode kernel does, so that a 16-bit cache gives the results
            # a float32 one gives.
            q_g, k_g, v_g = q_g.float(), k_g.float(), v_g.float()
        o = F.scaled_dot_product_attention(
            q_g.transpose(1, 2),
            k_g.transpose(1, 2),
            v_g.transpose(1, 2),
            attn_mask=g.mask,
            scale=scale,
            enable_gqa=num_heads != k.shape[1],
        )  # [B, H, Q, D]
        o = o.transpose(1, 2).reshape(-1, num_heads, head_dim).to(q.dtype)
        out[g.start : g.start + g.num_tokens] = o if g.out_index is None else o[g.out_index]
    return out


@functools.cache
def _decodes_in_place(device: torch.device) -> bool:
    """Whether decodes on `device` run the compiled paged kernel (the CPU, where it builds) rather than gathering
    their context for SDPA; decided once per device (the first call may compile the kernel, about 10 s)."""
    return device.type == "cpu" and compiled_paged_attention_available()

"""Paged decode attention: the compiled kernel and the torch reference against a dense float64 oracle, over cache
and query dtypes, GQA ratios, head sizes, ragged contexts and scattered blocks; input checks; the build fallback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from switchboard.kernels import cpp_build
from switchboard.kernels import paged_attention as pa

# Against the float64 oracle, keyed by q's dtype (the output's); both paths compute in float32, so the cache's
# dtype adds no error of its own (the oracle reads the same rounded cache values).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
BLOCK = 8
POISON = 1e4  # padding slots point into a block full of this: a kernel reading past ctx_len fails loudly


@dataclass
class Case:
    q: Tensor  # [B, H, D]
    k_cache: Tensor  # [num_slots, KV, D]
    v_cache: Tensor
    slots: Tensor  # [B, L]
    ctx_lens: Tensor  # [B]
    scale: float

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
        return self.q, self.k_cache, self.v_cache, self.slots, self.ctx_lens, self.scale


def make_case(B: int, H: int, KV: int, D: int, cache_dtype: torch.dtype, q_dtype: torch.dtype, seed: int = 0) -> Case:
    """Contexts of ragged lengths (1 and the longest included) in blocks scattered over a pool, block 0 poisoned."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 62, (B,), generator=gen)
    lens[0], lens[-1] = (1, 61) if B > 1 else (45, 45)
    L = int(lens.max())
    num_blocks = -(-L // BLOCK)
    pool = 1 + 2 * B * num_blocks
    k_cache = torch.randn(pool * BLOCK, KV, D, generator=gen).to(cache_dtype)
    v_cache = torch.randn(pool * BLOCK, KV, D, generator=gen).to(cache_dtype)
    k_cache[:BLOCK], v_cache[:BLOCK] = POISON, POISON
    tables = 1 + torch.randperm(pool - 1, generator=gen)[: B * num_blocks].view(B, num_blocks)  # [B, blocks]
    pos = torch.arange(L)
    slots = tables[:, pos // BLOCK] * BLOCK + pos % BLOCK  # [B, L]
    slots = torch.where(pos[None, :] < lens[:, None], slots, pos % BLOCK)  # padding: the poisoned block
    q = (torch.randn(B, H, D, generator=gen) * 2).to(q_dtype)  # peaked softmaxes as well as flat ones
    return Case(q, k_cache, v_cache, slots, lens, D**-0.5)


def dense_oracle(c: Case) -> Tensor:
    """Softmax attention of each (sequence, head) over its context, gathered by a loop, in float64."""
    B, H, D = c.q.shape
    G = H // c.k_cache.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        ctx = c.slots[b, : c.ctx_lens[b]]
        for h in range(H):
            k = c.k_cache[ctx, h // G].double()  # [n, D]
            v = c.v_cache[ctx, h // G].double()
            p = torch.softmax(c.scale * (k @ c.q[b, h].double()), dim=0)
            out[b, h] = p @ v
    return out


def check(out: Tensor, expected: Tensor, q_dtype: torch.dtype, what: str) -> None:
    assert out.dtype == q_dtype and out.shape == expected.shape, what
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[q_dtype], msg=lambda m: f"{what}\n{m}")


@pytest.fixture(scope="module")
def compiled() -> Callable[..., Tensor]:
    reason = pa.compiled_paged_attention_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the C++ paged attention kernel cannot be built here: {reason.splitlines()[0][:300]}")
    return pa.paged_decode_attention


CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
Q_DTYPES = [torch.float32, torch.bfloat16]
HEADS = [(4, 4), (8, 4), (8, 2)]  # (H, KV): no grouping, GQA 2, GQA 4
_ids = {"ids": lambda d: str(d).removeprefix("torch.")}


@pytest.mark.parametrize("B", [1, 33])
@pytest.mark.parametrize(("H", "KV"), HEADS, ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("q_dtype", Q_DTYPES, **_ids)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, **_ids)
def test_reference_matches_dense_oracle(cache_dtype, q_dtype, H, KV, B) -> None:
    c = make_case(B, H, KV, 64, cache_dtype, q_dtype)
    check(pa.paged_decode_attention_ref(*c.args()), dense_oracle(c), q_dtype, "reference")


@pytest.mark.parametrize("B", [1, 33])
@pytest.mark.parametrize(("H", "KV"), HEADS, ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("q_dtype", Q_DTYPES, **_ids)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, **_ids)
def test_compiled_matches_oracle_and_reference(compiled, cache_dtype, q_dtype, H, KV, B) -> None:
    c = make_case(B, H, KV, 64, cache_dtype, q_dtype, seed=B + H + KV)
    out = compiled(*c.args())
    check(out, dense_oracle(c), q_dtype, "compiled vs oracle")
    check(out, pa.paged_decode_attention_ref(*c.args()).double(), q_dtype, "compiled vs reference")


@pytest.mark.parametrize("D", [32, 80, 128])  # generic, generic, specialised (64 above)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], **_ids)
def test_compiled_head_dims(compiled, cache_dtype, D) -> None:
    c = make_case(9, 8, 2, D, cache_dtype, torch.float32, seed=D)
    check(compiled(*c.args()), dense_oracle(c), torch.float32, f"D={D}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], **_ids)  # bf16: AVX-512 BF16's path, where built
def test_compiled_reads_strided_queries_and_long_contexts(compiled, dtype) -> None:
    c = make_case(5, 8, 4, 64, torch.bfloat16, dtype, seed=7)
    wide = torch.randn(5, 8, 128, dtype=dtype)
    wide[..., 32:96] = c.q  # q as a non-contiguous view
    c.q = wide[..., 32:96]
    check(compiled(*c.args()), dense_oracle(c), dtype, "strided q")
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 4096, 2, 64, generator=gen).to(dtype)
    slots = torch.randperm(4096, generator=gen)[None, :3000]  # one sequence, 3000 positions, slots shuffled
    long = Case(torch.randn(1, 4, 64, generator=gen).to(dtype), k, v, slots, torch.tensor([3000]), 0.125)
    check(compiled(*long.args()), dense_oracle(long), dtype, "long context")


@pytest.mark.parametrize(("H", "KV"), [(9, 3), (10, 2), (16, 2)], ids=["gqa3", "gqa5", "gqa8"])
@pytest.mark.parametrize("D", [64, 128])
def test_compiled_bf16_decode_groups_and_head_dims(compiled, H, KV, D) -> None:
    """A bf16 model's decode: bf16 queries and cache, both specialised head sizes, and groups of query heads larger
    than the value sums the AVX-512 BF16 path keeps in registers at once (4 heads at D=64, 2 at D=128)."""
    c = make_case(17, H, KV, D, torch.bfloat16, torch.bfloat16, seed=H + D)
    out = compiled(*c.args())
    check(out, dense_oracle(c), torch.bfloat16, f"H={H} KV={KV} D={D}")
    check(out, pa.paged_decode_attention_ref(*c.args()).double(), torch.bfloat16, "compiled vs reference")


def test_compiled_rejects_bad_inputs(compiled) -> None:
    c = make_case(3, 4, 2, 64, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        compiled(c.q, c.k_cache, c.v_cache, c.slots.clone().fill_(len(c.k_cache)), c.ctx_lens, c.scale)
    with pytest.raises(RuntimeError, match="outside"):
        compiled(c.q, c.k_cache, c.v_cache, c.slots, c.ctx_lens * 0, c.scale)
    with pytest.raises(RuntimeError, match="outside"):
        compiled(c.q, c.k_cache, c.v_cache, c.slots, c.ctx_lens + 100, c.scale)
    with pytest.raises(RuntimeError, match="multiple of KV"):
        compiled(c.q[:, :3], c.k_cache, c.v_cache, c.slots, c.ctx_lens, c.scale)
    with pytest.raises(RuntimeError, match="int64"):
        compiled(c.q, c.k_cache, c.v_cache, c.slots.int(), c.ctx_lens, c.scale)


def test_failed_build_warns_once_and_falls_back_to_the_reference(tmp_path, caplog, monkeypatch) -> None:
    with caplog.at_level(logging.WARNING, logger=cpp_build.__name__):
        reason = cpp_build.build_ops("broken", "#error no kernel here\n", [], tmp_path)
    assert isinstance(reason, str) and "Error building extension" in reason
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "the torch path runs instead" in caplog.records[0].getMessage()
    monkeypatch.setattr(pa, "_built", lambda: reason)  # as if the kernel's own build had failed so
    assert pa._implementation.__wrapped__() is pa.paged_decode_attention_ref
    assert not pa.compiled_paged_attention_available()
    assert pa.compiled_paged_attention_unavailable_reason() == reason


def _prefill_case(dtype: torch.dtype, D: int, seed: int) -> tuple[Case, Tensor]:
    """Three sequences sharing a cache, each with its queries at the end of its context (one with earlier context, as
    a later prefill chunk has), flattened as a prefill group is: (decode-shaped case, seq_of)."""
    gen = torch.Generator().manual_seed(seed)
    H, KV, ctxs, q_lens = 6, 2, [40, 7, 23], [12, 7, 1]
    L = max(ctxs)
    k, v = (torch.randn(128, KV, D, generator=gen).to(dtype) for _ in range(2))
    slots = torch.stack([torch.randperm(127, generator=gen)[:L] for _ in ctxs])
    seq_of = torch.cat([torch.full((n,), i) for i, n in enumerate(q_lens)])
    ctx = torch.cat([torch.arange(c - n, c) + 1 for c, n in zip(ctxs, q_lens, strict=True)])  # causal: position + 1
    q = torch.randn(len(seq_of), H, D, generator=gen).to(dtype)
    return Case(q, k, v, slots, ctx, D**-0.5), seq_of


@pytest.mark.parametrize("D", [16, 64, 128])  # generic, and both specialised sizes (AVX-512 BF16's path in bf16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], **_ids)
def test_compiled_prefill_matches_the_decode_reference_on_each_querys_rows(compiled, dtype, D) -> None:
    """paged_prefill_attention is paged_decode_attention with each query's sequence row of `slots` (seq_of) and its
    own causal context length."""
    c, seq_of = _prefill_case(dtype, D, seed=D)
    out = pa.paged_prefill_attention(c.q, c.k_cache, c.v_cache, c.slots, c.ctx_lens, seq_of, c.scale)
    gathered = Case(c.q, c.k_cache, c.v_cache, c.slots[seq_of].contiguous(), c.ctx_lens, c.scale)
    check(out, dense_oracle(gathered), dtype, "prefill vs oracle")
    check(out, pa.paged_decode_attention_ref(*gathered.args()).double(), dtype, "prefill vs reference")


def test_compiled_prefill_rejects_bad_rows(compiled) -> None:
    c, seq_of = _prefill_case(torch.float32, 16, seed=3)
    args = (c.q, c.k_cache, c.v_cache, c.slots, c.ctx_lens)
    with pytest.raises(RuntimeError, match="not a row of slots"):
        pa.paged_prefill_attention(*args, torch.full_like(seq_of, 3), c.scale)
    with pytest.raises(RuntimeError, match="seq_of must be"):
        pa.paged_prefill_attention(*args, seq_of[:-1], c.scale)
    bad = c.slots.clone()
    bad[0, 39] = 10_000  # read by the first sequence's last query only
    with pytest.raises(RuntimeError, match=r"slots\[0, 39\] is out of range"):
        pa.paged_prefill_attention(c.q, c.k_cache, c.v_cache, bad, c.ctx_lens, seq_of, c.scale)

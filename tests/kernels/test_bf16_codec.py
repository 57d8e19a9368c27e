"""Coded bf16 LoRA slots (kernels/bf16_codec.py): the coding is lossless, and the compiled op reading coded slots
gives the raw op's output bit for bit, over shapes, token patterns, escapes and slots too wide-ranging to code."""

from __future__ import annotations

import pytest
import torch

from switchboard.kernels import bf16_codec, cpu_adapters, sgmv

needs_compiled = pytest.mark.skipif(
    not cpu_adapters.compiled_adapters_available(), reason="the compiled op library (the encoder) is not built here"
)
needs_coded = pytest.mark.skipif(
    not cpu_adapters.compiled_adapters_available() or not cpu_adapters.coded_slots_pay(),
    reason="the compiled op with its AVX-512 decoder is not built here",
)


def _slots(S: int, K: int, N: int, seed: int) -> torch.Tensor:
    """bf16 slots as trained adapters hold them, with the awkward values in some: zeros, signed zeros, subnormals,
    weights far below the rest (escapes), an all-zero slot, and one spanning so many binades it cannot be coded."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(S, K, N, generator=g) / K**0.5).to(torch.bfloat16)
    flat = w.view(S, -1)
    if S > 1:
        flat[1] = 0
    if S > 2 and K * N >= 8:
        flat[2, :8] = torch.tensor([0.0, -0.0, 1e-39, -1e-40, 1e-20, -3e-25, 1e-30, 2.0**-100])
    if S > 3:
        flat[3] = (torch.randn(K * N, generator=g) * torch.logspace(-30, 30, K * N)).to(torch.bfloat16)
    return w


def _coded(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.empty(w.shape[0], bf16_codec.coded_row_bytes(*w.shape[1:]), dtype=torch.uint8)
    return rows, bf16_codec.encode_slots(w, rows)


@needs_compiled
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (16, 64), (16, 80), (512, 48), (1376, 16), (16, 1376), (7, 130)])
def test_coding_is_lossless(K, N) -> None:
    w = _slots(5, K, N, seed=K * 1000 + N)
    rows, coded = _coded(w)
    assert rows.shape[1] % 64 == 0
    assert coded[[0, 1, 2, 4]].all()
    assert bool(coded[3]) == (K * N < 256)  # slot 3 spans 60 decades: a few weights fit the table, many cannot
    for s in range(5):
        if coded[s]:
            assert torch.equal(bf16_codec.decode_slot(rows[s], K, N).view(torch.int16), w[s].view(torch.int16))
        else:  # the op reads the raw slot
            assert rows[s, bf16_codec.ESCAPE] == 0
            with pytest.raises(ValueError, match="not coded"):
                bf16_codec.decode_slot(rows[s], K, N)


def test_coded_order_is_column_tiles_padded_to_granules() -> None:
    order = bf16_codec.coded_order(3, 80)  # a 64-column tile (192 weights), then a 16-column one (48 + 16 padding)
    assert order.numel() == 192 + 64
    assert order[:3].tolist() == [0, 1, 2] and order[64].item() == 80  # row 1 of the first tile
    assert order[192:195].tolist() == [64, 65, 66] and order[208].item() == 80 + 64
    assert (order[240:] == -1).all()
    assert sorted(order[order >= 0].tolist()) == list(range(240))
    for K, N in [(3, 80), (1, 1), (7, 130), (16, 1376), (512, 48)]:
        assert bf16_codec.coded_granules(K, N) * bf16_codec.GRANULE == bf16_codec.coded_order(K, N).numel()


@needs_compiled
def test_encode_refuses_other_dtypes_and_row_sizes() -> None:
    rows = torch.empty(2, bf16_codec.coded_row_bytes(4, 16), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="bf16"):
        bf16_codec.encode_slots(torch.zeros(2, 4, 16), rows)
    with pytest.raises(ValueError, match="rows must be"):
        bf16_codec.encode_slots(torch.zeros(2, 4, 32, dtype=torch.bfloat16), rows)


# (rank, in, part widths, slots): the demo model's q|k|v, o, gate|up and down, then narrow and odd shapes (where
# the op keeps to the raw slots for whatever it cannot tile without padding).
SHAPES = [
    (16, 512, (512, 512, 512), 32),
    (16, 512, (512,), 8),
    (16, 512, (1376, 1376), 8),
    (16, 1376, (512,), 8),
    (8, 64, (176, 176), 4),
    (1, 96, (40,), 4),
    (5, 33, (7, 19), 4),
    (32, 128, (80, 48), 4),
]
PATTERNS = {
    "distinct": lambda T, S: [t % S for t in range(T)],
    "pairs": lambda T, S: [t // 2 % S for t in range(T)],
    "nine-of-one": lambda T, S: [0] * 9 + [1 + t % (S - 1) for t in range(T - 9)],
    "some-without": lambda T, S: [-1 if t % 5 == 0 else t * 7 % S for t in range(T)],
}


@needs_coded
@pytest.mark.parametrize("shape", SHAPES, ids=[f"r{r}-in{i}-{'+'.join(map(str, p))}" for r, i, p, _ in SHAPES])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_coded_op_equals_raw_op_bit_for_bit(shape, pattern) -> None:
    r, d_in, widths, S = shape
    A = _slots(S, d_in, len(widths) * r, seed=1)
    Bs = [_slots(S, r, w, seed=2 + p) for p, w in enumerate(widths)]
    coded = [_coded(t)[0] for t in (A, *Bs)]
    cols, rows = [sum(widths[:p]) for p in range(len(widths))], [p * r for p in range(len(widths))]
    T = 24
    slots = torch.tensor(PATTERNS[pattern](T, S))
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    y = torch.randn(T, sum(widths), generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    raw = cpu_adapters.lora_packed_gather_lists(y.clone(), x, slots, A, Bs, cols, rows, r, [])
    out = cpu_adapters.lora_packed_gather_lists(y.clone(), x, slots, A, Bs, cols, rows, r, coded)
    assert torch.equal(out.view(torch.int16), raw.view(torch.int16))


@needs_coded
def test_pack_lora_codes_bf16_slots_and_recodes_a_changed_one() -> None:
    S, r, d_in, w = 4, 16, 64, 96
    A = sgmv.to_k_major(torch.randn(S, r, d_in).to(torch.bfloat16))
    B = sgmv.to_k_major(torch.randn(S, w, r).to(torch.bfloat16))
    lora = sgmv.pack_lora(A, [(B, 0, 0)])
    c = lora.compiled
    A_storage, (B_storage,), cols, rows, coded = c.a_storage, c.b_storages, c.cols, c.rows, c.coded
    assert len(coded) == 2 and all(c.dtype == torch.uint8 for c in coded)
    assert sgmv.pack_lora(A, [(B, 0, 0)], code_slots=False).compiled.coded == []
    x, slots = torch.randn(S, d_in).to(torch.bfloat16), torch.arange(S)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.zeros(S, w, dtype=torch.bfloat16)
        return (
            cpu_adapters.lora_packed_gather_lists(y.clone(), x, slots, A_storage, [B_storage], cols, rows, r, []),
            cpu_adapters.lora_packed_gather_lists(y.clone(), x, slots, A_storage, [B_storage], cols, rows, r, coded),
        )

    raw, out = both()
    assert torch.equal(raw, out)
    A[2] *= 3  # the slot cache writes a slot in place, then recodes it
    B[2] = -B[2]
    lora.recode(2)
    raw2, out2 = both()
    assert not torch.equal(raw2[2], raw[2]) and torch.equal(raw2, out2)


@needs_coded
def test_op_rejects_bad_coded_stacks() -> None:
    A, B = torch.zeros(2, 16, 16, dtype=torch.bfloat16), torch.zeros(2, 16, 32, dtype=torch.bfloat16)
    x, y, slots = torch.zeros(3, 16, dtype=torch.bfloat16), torch.zeros(3, 32, dtype=torch.bfloat16), torch.zeros(3)
    slots = slots.long()
    ok = [_coded(A)[0], _coded(B)[0]]
    op = cpu_adapters.lora_packed_gather_lists
    with pytest.raises(RuntimeError, match="one coded stack for A and one per B"):
        op(y, x, slots, A, [B], [0], [0], 16, ok[:1])
    with pytest.raises(RuntimeError, match="room for"):
        op(y, x, slots, A, [B], [0], [0], 16, [ok[0], ok[1][:, :64]])
    with pytest.raises(RuntimeError, match="room for"):
        op(y, x, slots, A, [B], [0], [0], 16, [ok[0].float(), ok[1]])
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(y.float(), x.float(), slots, A.float(), [B.float()], [0], [0], 16, ok)

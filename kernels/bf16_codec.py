"""Lossless 12-bit coding of bf16 LoRA slots, so that the compiled CPU op reads a quarter fewer bytes.

With 32 distinct adapters in a decode batch every slot's weights come from memory once a step, and the op runs at the
machine's streaming rate (`switchboard.bench.stream`). A bf16 weight's high byte (sign and the upper seven exponent
bits) takes few values in one slot matrix: the weights of a matrix span a few binades. So each weight is stored as its
low byte and a 4-bit code that indexes the slot's table of its 15 most common high bytes; code 15 escapes to the slot's
list of weights stored whole. Decoding is exact: the op gets the very weights of the raw stack, and its sums are the
same bit for bit (tests/kernels/test_bf16_codec.py checks both).

A coded stack is a uint8 tensor [S, L], one row per slot:
- bytes [0, 15): the table of high bytes; byte 15 is 1 when the slot is coded, 0 when it is not (more escapes than
  its room, which no trained adapter comes near: the op then reads that slot's raw stack);
- then room for `escape_room(n)` escaped weights (bf16 bits, little-endian, in weight order);
- the row ends with the granules of the slot's coded sequence (`coded_order`), 96 bytes each: 32 bytes of codes
  (byte b holds storage position b in its low nibble and b + 32 in its high one), then the 64 low bytes. Weight p
  of a granule is at storage position `_STORAGE[p]` (p with its bit pairs 2-3 and 4-5 swapped), the order the
  AVX-512 unpacks in the op produce.

The raw stacks stay: prefill runs, many tokens of one adapter and the other kernels read them. A coded stack takes
0.76x the memory of its raw one, in addition.

- coded_order(K, N): the order in which a [K, N] slot's weights are coded (column tiles, each row-major)
- coded_granules(K, N), coded_row_bytes(K, N): granules and row bytes L for [K, N] slot matrices
- encode_slots(weights, rows): code each slot into its row (in the compiled op library); which slots are coded (a
  slot with more escapes than its room is marked not coded)
- coded_stack(weights): a coded copy of a whole stack
- decode_slot(row, K, N): the slot back (the spec, and the tests' oracle)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_adapters

GRANULE = 64  # weights per granule
GRANULE_BYTES = 96  # 32 bytes of 4-bit codes, 64 low bytes
TILE_COLUMNS = 64  # a coded [K, N] slot is stored as column tiles this wide (the last may be narrower)
ESCAPE = 15  # the code that takes the slot's next escaped weight
HEADER = 16  # the table (15 high bytes) and the coded flag

_p = torch.arange(GRANULE)
_STORAGE = (_p & 3) | ((_p >> 4) & 3) << 2 | ((_p >> 2) & 3) << 4  # weight p's storage position in its granule


def coded_order(K: int, N: int) -> Tensor:
    """The coded sequence of a [K, N] slot as indices into its row-major weights, -1 for padding: column tiles of up
    to 64 columns, left to right, each row-major and padded to whole granules. A tile of c columns is what the op's
    register tile reads for c output columns, K rows in order (`cpu_adapters.coded_tile`)."""
    parts = []
    for c0 in range(0, N, TILE_COLUMNS):
        c1 = min(N, c0 + TILE_COLUMNS)
        tile = (torch.arange(K)[:, None] * N + torch.arange(c0, c1)[None, :]).view(-1)
        parts += [tile, torch.full((-tile.numel() % GRANULE,), -1)]
    return torch.cat(parts)


def escape_room(n: int) -> int:
    """Escaped weights a row is sized for, for slots of n weights: one in 256 (trained and random slots escape far
    fewer). The encoder uses whatever room the row has between its header and its granules."""
    return max(16, n // 256)


def coded_granules(K: int, N: int) -> int:
    """Granules of a coded [K, N] slot: `coded_order(K, N)` has this many times 64 places."""
    return N // TILE_COLUMNS * K + -(-K * (N % TILE_COLUMNS) // GRANULE)


def coded_row_bytes(K: int, N: int) -> int:
    """Bytes of one slot's row for [K, N] slot matrices (a multiple of 64, so rows stay line-aligned)."""
    size = HEADER + 2 * escape_room(K * N) + GRANULE_BYTES * coded_granules(K, N)
    return -(-size // 64) * 64


def encode_slots(weights: Tensor, rows: Tensor) -> Tensor:
    """Code each [K, N] slot of bf16 `weights` ([S, K, N]) into its row of `rows` (a CPU uint8 [S, L]), in the
    compiled op library (a slot cache codes every slot it loads: in torch ops this took 38 ms an adapter, in C++ a
    millisecond or two). Returns which slots are coded ([S] bool): a slot with more escapes than its room is marked
    not coded. Raises if the library is not built here (no slot is coded there)."""
    S, K, N = weights.shape
    if rows.shape != (S, coded_row_bytes(K, N)):
        raise ValueError(f"rows must be [{S}, {coded_row_bytes(K, N)}] for [{K}, {N}] slots, got {tuple(rows.shape)}")
    if not cpu_adapters.compiled_adapters_available():
        raise RuntimeError(
            f"the compiled op library is not built here: {cpu_adapters.compiled_adapters_unavailable_reason()}"
        )
    torch.ops.switchboard.encode_coded_slots(weights.detach().contiguous(), rows)
    return rows[:, ESCAPE] == 1


def coded_stack(weights: Tensor) -> Tensor:
    """A coded copy of a stack of bf16 [K, N] slots ([S, K, N]): a new uint8 [S, L], every slot coded."""
    rows = torch.empty(weights.shape[0], coded_row_bytes(*weights.shape[1:]), dtype=torch.uint8)
    encode_slots(weights, rows)
    return rows


def decode_slot(row: Tensor, K: int, N: int) -> Tensor:
    """The [K, N] bf16 slot a coded row holds (raises if the row is not coded).

    Semantics:
        for each place i of the coded sequence (granule i // 64, storage position j = _STORAGE[i % 64]):
            code = nibble j of the granule's codes
            value i = escapes.pop_front() if code == 15 else table[code] << 8 | low[j]
        slot.view(-1)[coded_order(K, N)[i]] = value i, where that index is not padding
    """
    row = row.cpu()
    if row[ESCAPE] != 1:
        raise ValueError("the slot is not coded")
    order = coded_order(K, N)
    g, L = order.numel() // GRANULE, row.numel()
    body = row[L - GRANULE_BYTES * g :].view(g, GRANULE_BYTES).to(torch.int32)
    stored_codes = torch.cat([body[:, :32] & 0xF, body[:, :32] >> 4], dim=1)
    codes = stored_codes[:, _STORAGE].reshape(-1)
    low = body[:, 32:][:, _STORAGE].reshape(-1)
    bits = row[:ESCAPE].to(torch.int32)[codes.clamp(max=ESCAPE - 1)] << 8 | low
    escaped = codes == ESCAPE
    bits[escaped] = row[HEADER : HEADER + 2 * int(escaped.sum())].view(torch.int16).to(torch.int32) & 0xFFFF
    slot = torch.empty(K * N, dtype=torch.int32)
    slot[order[order >= 0]] = bits[order >= 0]
    return _int16(slot).view(torch.bfloat16).view(K, N)


def _int16(bits: Tensor) -> Tensor:
    """16-bit patterns held in int32 (0 to 65535) as int16, without relying on how a narrowing cast wraps."""
    return (((bits + 0x8000) & 0xFFFF) - 0x8000).to(torch.int16)

"""Compiled CPU ops for the gathered (decode) tokens of a step: LoRA on a packed linear, and KronA on one part.

LoRA. The torch gather path (`sgmv.lora_shrink` / `lora_expand` over k-major slots) is two embedding bags per part plus
the index tensors they need, each call a few microseconds of dispatch and a pass over its output; for a packed q|k|v
that is seven calls per layer. Here one C++ call per packed linear does it all: tokens are grouped by slot (a counting
pass), each group is cut into blocks of up to 8 tokens, and threads take runs of blocks. First every block's shrink (h =
x A^T in float32, never rounded; each of the slot's A rows read once for the block's tokens), then, part by part, every
block's expand, adding the delta into the part's columns of y in place. Shrinks first and parts one after another make
each thread read one sequence of stacks (slot after slot) rather than alternating between A and three B's per slot; with
32 distinct adapters, where the weights come from memory, the op went from about 23 GB/s to about 33 GB/s, this
machine's streaming rate (a `sum` over 128 MiB). Weights a call reads once (a slot whose tokens fit one block, as with
32 distinct adapters) are prefetched non-temporally a little ahead, so that the stream evicts less of what the rest of
the step keeps in L2 and L3 (`switchboard.bench.stream` shows the working set it leaves; in the engine, 32 distinct
all-linear adapters cost about 0.12 ms a step less). Long runs (prefill chunks) stay on the GEMM path, which does them
better.

Coded slots. Where the caller passes coded copies of bf16 stacks (`bf16_codec`: 12 bits a weight, lossless), a slot
with one or two tokens in the call is read from them: each granule of 64 weights is decoded with AVX-512 byte
shuffles straight into the registers of a column tile (`coded_tile`), whose sums are rows_matmul's in the same order,
so the output is the raw op's bit for bit. With 32 distinct adapters the op reads 0.76x the bytes and takes about
0.8x the time (`switchboard.bench.stream`).

Slots must be k-major (A stored as [S, in, W], each part's B as [S, r, out], the layout that
serving/adapters/layouts/lora.py allocates); the functions here take those storage tensors, not the transposed views
the torch kernels take.

KronA. The torch path groups tokens by slot into a padded batch for two bmm's, with permutes between them: about
eight small ops per projection for a few thousand multiply-adds per token. The C++ op groups tokens by slot as for
LoRA and, per block, takes Z = X W2^T for all the block's tokens as one register-tiled product (X = x[t] as
[i1, i2] rows), then y[t] += (W1 Z_t).flatten() per token, in float32.

- lora_packed_gather: LoRA on the tokens with a slot in `token_slots` (CPU tensors); its spec and test oracle is
  `sgmv.lora_packed_ref`, on the transposed views
- kron_gather: KronA on the tokens with a slot in `token_slots`; spec and oracle `kron.kron_apply_ref`
- compiled_adapters_available / compiled_adapters_unavailable_reason: whether the ops are built here (builds them on
  first use)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .cpp_build import build_ops, read_source

Part = tuple[Tensor, int, int]  # (B storage [S, r, out], first column in y, first row of h)


def lora_packed_gather(
    y: Tensor, x: Tensor, token_slots: Tensor, A: Tensor, parts: Sequence[Part], r: int, coded: Sequence[Tensor] = ()
) -> Tensor:
    """`sgmv.lora_packed` for the tokens with a slot, in one compiled call, in place on y (CPU tensors; raises if
    the op is not built here).

    Args:
        y: [T, out_total] packed output, rows contiguous (a row stride is fine).
        x: [T, in] activations, rows contiguous.
        token_slots: [T] int64, the slot of each token this call handles, -1 for the others.
        A: [S, in, W] contiguous stacked down-projections (W = parts x r, zero-padded ranks).
        parts: (B [S, r, out] contiguous, column of y, row of h) per part.
        r: the padded rank.
        coded: empty, or bf16 slots' coded stacks (`bf16_codec`), A's and then each part's B's: a slot with one
            or two tokens in the call is read from them where its row is coded and the matrix tiles without
            padding (a multiple of 16 columns; a rank-8 q|k|v shrink, 24 columns, is not), else from the raw stacks.
    """
    _require_built()
    return lora_packed_gather_lists(
        y, x, token_slots, A, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], r, list(coded)
    )


def lora_packed_gather_lists(
    y: Tensor,
    x: Tensor,
    token_slots: Tensor,
    A: Tensor,
    Bs: list[Tensor],
    cols: list[int],
    rows: list[int],
    r: int,
    coded: list[Tensor],
) -> Tensor:
    """`lora_packed_gather` with the parts given as lists, straight to the op (the per-linear hot path, whose
    operands `sgmv.pack_lora` derived and checked once; the op itself checks every shape)."""
    torch.ops.switchboard.lora_packed_gather(y, x, token_slots, A, Bs, cols, rows, r, coded)
    return y


def kron_gather(y: Tensor, x: Tensor, token_slots: Tensor, W1: Tensor, W2: Tensor) -> Tensor:
    """`kron.kron_apply` for the tokens with a slot, in one compiled call, in place on y (CPU tensors).

    Args:
        y: [T, o1 * o2] output, rows contiguous (a column slice of a packed output is fine).
        x: [T, i1 * i2] activations, rows contiguous.
        token_slots: [T] int64, the slot of each token this call handles, -1 for the others.
        W1: [S, o1, i1] contiguous stacked first factors (scale folded in); W2: [S, o2, i2] second factors.
    """
    _require_built()
    torch.ops.switchboard.kron_gather(y, x, token_slots, W1, W2)
    return y


def scale_gather(x: Tensor, token_slots: Tensor, V: Tensor) -> Tensor:
    """`scale.segmented_scale` for the tokens with a slot, in one compiled call, in place on x (CPU tensors).

    Args:
        x: [T, n] activations, rows contiguous (a column slice of a packed output is fine).
        token_slots: [T] int64, the slot of each token this call handles, -1 for the others.
        V: [S, n] contiguous stacked scaling vectors.
    """
    _require_built()
    torch.ops.switchboard.scale_gather(x, token_slots, V)
    return x


@functools.cache
def _built() -> str | None:
    return build_ops("cpu_adapters", read_source("cpu_adapters"))


def _require_built() -> None:
    reason = _built()
    if reason is not None:
        raise RuntimeError(f"the compiled adapter ops are not available: {reason}")


def applies(rows: Sequence[Tensor], whole: Sequence[Tensor]) -> bool:
    """Whether the compiled ops can take these operands here: they fit (`operands_fit`) and the library is built."""
    return operands_fit(rows, whole) and compiled_adapters_available()


def operands_fit(rows: Sequence[Tensor], whole: Sequence[Tensor]) -> bool:
    """Whether the compiled ops take these operands: `rows` (activations, outputs) CPU tensors with contiguous rows,
    `whole` (slot stacks) contiguous CPU tensors. The torch paths take everything else."""
    return rows_apply(*rows) and all(t.device.type == "cpu" and t.is_contiguous() for t in whole)


def rows_apply(*rows: Tensor) -> bool:
    """The per-call half of `applies`: activations and outputs are CPU tensors with contiguous rows."""
    return all(t.is_cpu and t.stride(-1) == 1 for t in rows)  # `is_cpu`: no device object per linear and step


def coded_slots_pay() -> bool:
    """Whether coding bf16 LoRA slots (`bf16_codec`) pays here: the op is built, with its AVX-512 decoder (without
    it the op decodes weight by weight, slower than reading the raw stack)."""
    return compiled_adapters_available() and bool(torch.ops.switchboard.coded_decode_vectorized())


def compiled_adapters_available() -> bool:
    """Whether the C++ ops are built and loaded here (compiles them on the first call, a few seconds)."""
    return _built() is None


def compiled_adapters_unavailable_reason() -> str | None:
    return _built()

"""Per-step batch metadata for the adapter kernels: which slot each token uses, grouped once per step.

One step is one flattened token batch (prefill chunks and decode tokens together). Tokens are never reordered.
`build_segments` describes the batch three ways, once, on the host:

- segments: maximal runs of equal slot ids in token order (`starts`, `slots`): what SGMV and the Triton kernels
  take, one program per segment;
- long runs: runs of at least `MIN_GEMM_RUN` tokens with a slot: the torch path does one matmul per long run on
  the slot's weights in place (prefill chunks);
- short tokens: every other token with a slot (decode tokens, short runs): the torch path handles them all at once
  in a gather form (`Gather`): an embedding bag over k-major slots, or the tokens grouped by slot into a padded
  [U, width] batch over the U distinct slots; never a copy of adapter weights per token.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

NO_SLOT = -1  # token_slots value for "no adapter of this kind"

# Runs at least this long get their own matmuls on the torch path; shorter ones join the gather form. On the CPU
# (2 threads) a small bf16 matmul costs about 20 us however small (oneDNN's fixed overhead; float32 about 3 us),
# the embedding-bag gather form about 0.5 us per token at in = out = 512, r = 16: they break even near 70 tokens
# in bf16, the serving dtype.
MIN_GEMM_RUN = 64

Run = tuple[int, int, int]  # (start, end, slot): token rows [start, end) use `slot`


@dataclass(frozen=True, slots=True)
class Gather:
    """Tokens handled at once by the gather form: adapted tokens outside long runs, in token order.

    N = number of such tokens, U = number of distinct slots among them.
    """

    rows: Tensor  # [N] int64, token indices (ascending)
    slots: Tensor  # [N] int64, their slots
    token_slots: Tensor  # [T] int64, the slot of each gathered token, NO_SLOT for every other token
    distinct: Tensor  # [U] int64, their distinct slots, ascending
    padded_pos: Tensor  # [N] int64, row of each token in a [U, width] layout: u * width + rank within slot u
    width: int  # most tokens of one slot
    in_order: bool  # padded_pos == arange(U * width): the rows already are the padded layout (no padding, sorted)
    covers_all: bool  # rows == arange(T): every token of the batch, in order
    all_slots: bool  # distinct == arange(U): slots 0..U-1 exactly, so weights[:U] needs no gathering
    # Embedding-bag indices, built on first use and kept for the step: n -> [N * n] int64.
    bag_index: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.rows.numel()

    def bag_indices(self, n: int) -> Tensor:
        """Rows of a [S * n, m] table (slots stacked) that each token reads: slot * n + k for k < n; [N * n]."""
        if n not in self.bag_index:
            k = torch.arange(n, dtype=torch.int64, device=self.slots.device)
            self.bag_index[n] = (self.slots[:, None] * n + k).reshape(-1)
        return self.bag_index[n]

    def padded(self, rows: Tensor) -> Tensor:
        """Rows [N, n] grouped by slot into a zero-padded [U, width, n] batch (a view when already in that order)."""
        U, n = self.distinct.numel(), rows.shape[1]
        if self.in_order:
            return rows.reshape(U, self.width, n)
        return rows.new_zeros(U * self.width, n).index_copy_(0, self.padded_pos, rows).view(U, self.width, n)

    def unpadded(self, out: Tensor) -> Tensor:
        """[U, width, m] -> the gathered tokens' rows, [N, m], in token order."""
        out = out.reshape(-1, out.shape[-1])
        return out if self.in_order else out.index_select(0, self.padded_pos)

    def to(self, device: torch.device | str) -> Gather:
        return Gather(
            rows=self.rows.to(device),
            slots=self.slots.to(device),
            token_slots=self.token_slots.to(device),
            distinct=self.distinct.to(device),
            padded_pos=self.padded_pos.to(device),
            width=self.width,
            in_order=self.in_order,
            covers_all=self.covers_all,
            all_slots=self.all_slots,
        )


@dataclass(frozen=True, slots=True)
class Segments:
    """One step's token-to-slot map. G = number of runs (maximal stretches of equal slot ids, -1 runs included)."""

    token_slots: Tensor  # [T] int64, slot per token, NO_SLOT = no adapter of this kind
    starts: Tensor  # [G+1] int64, token offset of each run: starts[0] = 0, starts[G] = T
    slots: Tensor  # [G] int64, slot of each run (NO_SLOT runs included)
    max_segment_len: int  # longest run (0 for an empty batch)
    all_single: bool  # every run has length 1 (a decode-only batch)
    long_runs: tuple[Run, ...]  # runs of >= MIN_GEMM_RUN tokens with a slot, in token order (host ints)
    gather: Gather  # every other token with a slot
    num_tokens: int  # T
    num_adapted: int  # tokens with a slot

    @property
    def has_unadapted(self) -> bool:
        """Some token carries no adapter of this kind."""
        return self.num_adapted < self.num_tokens

    def to(self, device: torch.device | str) -> Segments:
        """The same metadata with its tensors on `device`."""
        return Segments(
            token_slots=self.token_slots.to(device),
            starts=self.starts.to(device),
            slots=self.slots.to(device),
            max_segment_len=self.max_segment_len,
            all_single=self.all_single,
            long_runs=self.long_runs,
            gather=self.gather.to(device),
            num_tokens=self.num_tokens,
            num_adapted=self.num_adapted,
        )


def _runs(values: list[int]) -> tuple[list[int], list[int]]:
    """Maximal runs of equal values: (starts [G+1], run values [G])."""
    starts, run_values = [], []
    for t, v in enumerate(values):
        if not run_values or v != run_values[-1]:
            starts.append(t)
            run_values.append(v)
    starts.append(len(values))
    return starts, run_values


def _gather(rows: list[int], slots: list[int], num_tokens: int) -> Gather:
    """Group the tokens `rows` (ascending) with slots `slots` by slot, keeping token order inside."""
    distinct = sorted(set(slots))
    group_of = {s: u for u, s in enumerate(distinct)}
    counts = [0] * len(distinct)
    padded_rank = []
    for s in slots:  # rank of each token within its slot, in token order
        padded_rank.append(counts[group_of[s]])
        counts[group_of[s]] += 1
    width = max(counts, default=0)
    padded_pos = [group_of[s] * width + k for s, k in zip(slots, padded_rank, strict=True)]
    token_slots = [NO_SLOT] * num_tokens
    for t, s in zip(rows, slots, strict=True):
        token_slots[t] = s
    as_long = functools.partial(torch.tensor, dtype=torch.int64)
    return Gather(
        rows=as_long(rows),
        slots=as_long(slots),
        token_slots=as_long(token_slots),
        distinct=as_long(distinct),
        padded_pos=as_long(padded_pos),
        width=width,
        in_order=padded_pos == list(range(len(distinct) * width)),
        covers_all=len(rows) == num_tokens,
        all_slots=distinct == list(range(len(distinct))),
    )


def build_segments(
    token_slots: list[int] | Tensor, device: torch.device | str | None = None, min_gemm_run: int = MIN_GEMM_RUN
) -> Segments:
    """Group one step's per-token slot ids (NO_SLOT = no adapter) into segments, long runs and the gather form.

    Pure host work, done on Python ints (a step has at most a few thousand tokens, and a few dozen small tensor ops
    cost more than the loops); `device` (default: the CPU) is where the tensor fields are placed for the kernels.
    Runs of at least `min_gemm_run` tokens with a slot become long runs.
    """
    if isinstance(token_slots, Tensor):
        token_slots = token_slots.detach().to("cpu").reshape(-1).tolist()
    ts = [int(s) for s in token_slots]
    if ts and min(ts) < NO_SLOT:
        raise ValueError(f"slot ids must be >= {NO_SLOT}, got {min(ts)}")
    starts, slots = _runs(ts)
    lengths = [end - start for start, end in itertools.pairwise(starts)]

    long_runs: list[Run] = []
    rows: list[int] = []
    for start, end, slot in zip(starts[:-1], starts[1:], slots, strict=True):
        if slot == NO_SLOT:
            continue
        if end - start >= min_gemm_run:
            long_runs.append((start, end, slot))
        else:
            rows.extend(range(start, end))

    segments = Segments(
        token_slots=torch.tensor(ts, dtype=torch.int64),
        starts=torch.tensor(starts, dtype=torch.int64),
        slots=torch.tensor(slots, dtype=torch.int64),
        max_segment_len=max(lengths, default=0),
        all_single=all(n == 1 for n in lengths),
        long_runs=tuple(long_runs),
        gather=_gather(rows, [ts[t] for t in rows], len(ts)),
        num_tokens=len(ts),
        num_adapted=sum(s != NO_SLOT for s in ts),
    )
    return segments if device is None else segments.to(device)

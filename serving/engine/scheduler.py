"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step is one flattened token batch under `max_batch_tokens`: first every running sequence (a decode token, or
the next chunk of an unfinished prefill), then newly admitted ones, while there are free blocks for their prompt and
fewer than `max_num_seqs` run. When a running sequence needs a block and none is free, the most recently admitted
sequence is preempted by recompute: its blocks are freed and it returns to the head of the queue.

Admission order: preempted sequences first, then the waiting ones taking turns over tenants (the tenant served
longest ago first, FIFO within a tenant), so one tenant's flood does not starve the others. A sequence whose adapter
has no free device slot is skipped, not waited on: the others behind it proceed. So that it is not overtaken
forever, once it has waited `slot_wait_s`, sequences of its adapter kind stop being admitted until a slot frees.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import FinishReason
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled from it."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    decodes: list[ScheduledSeq] = field(default_factory=list)  # one token each
    prefills: list[ScheduledSeq] = field(default_factory=list)  # chunks of uncomputed tokens
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler (they can never fit)
    num_preempted: int = 0

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(s.num_tokens for s in self.prefills)


def _always(_: Sequence) -> bool:
    return True


def _nothing(_: Sequence) -> None:
    return None


class Scheduler:
    """`on_admit` may refuse a sequence (its adapter has no free device slot); `on_release` undoes it."""

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_batch_tokens: int,
        on_admit: Callable[[Sequence], bool] = _always,
        on_release: Callable[[Sequence], None] = _nothing,
        slot_wait_s: float = 0.5,
    ) -> None:
        self.on_admit = on_admit
        self.slot_wait_s = slot_wait_s
        self._served: dict[str, int] = {}  # tenant -> admission counter when it was last served
        self._admissions = itertools.count(1)
        self.on_release = on_release
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.on_release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.on_release(seq)
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batch_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n == 0:  # nothing new to compute (cannot happen after a sampled step, but cost nothing)
                i += 1
                continue
            target = seq.num_computed + n
            while not self.blocks.can_grow(seq, target) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                out.num_preempted += 1
            if not self.blocks.can_grow(seq, target):
                if len(self.running) == 1:  # alone and still too long for the whole pool
                    self.finish(seq, FinishReason.LENGTH)
                    out.finished.append(seq)
                else:
                    self._preempt(seq)
                    out.num_preempted += 1
                break
            self.blocks.grow(seq, target)
            is_decode = n == 1 and seq.num_uncomputed == 1
            (out.decodes if is_decode else out.prefills).append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        if out.num_preempted or not self.waiting or budget <= 0 or len(self.running) >= self.max_num_seqs:
            return out
        held_kinds: set[object] = set()  # kinds whose slots are reserved for a sequence that waited too long
        now = time.monotonic()
        for seq in self._admission_order():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if self.blocks.blocks_needed(seq, seq.num_tokens) > self.blocks.num_blocks:
                self.finish(seq, FinishReason.LENGTH)  # could never fit, even alone
                out.finished.append(seq)
                continue
            if not self.blocks.can_grow(seq, seq.num_tokens):
                break  # memory is first come, first served
            if seq.adapter_kind in held_kinds:
                continue
            if not self.on_admit(seq):  # its adapter has no free slot: let the others pass
                if now - seq.arrival_time >= self.slot_wait_s:
                    held_kinds.add(seq.adapter_kind)
                continue
            self.waiting.remove(seq)
            self._served[seq.tenant] = next(self._admissions)
            self.blocks.grow(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            (out.decodes if n == 1 and seq.num_uncomputed == 1 else out.prefills).append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _admission_order(self) -> Iterator[Sequence]:
        """Preempted sequences first; then round-robin over tenants, least recently served first, FIFO within."""
        by_tenant: dict[str, list[Sequence]] = {}
        for seq in list(self.waiting):
            if seq.num_preemptions:
                yield seq
            else:
                by_tenant.setdefault(seq.tenant, []).append(seq)
        if len(by_tenant) == 1:
            yield from next(iter(by_tenant.values()))
            return
        queues = sorted(by_tenant.values(), key=lambda q: (self._served.get(q[0].tenant, 0), q[0].arrival_time))
        for round_ in itertools.zip_longest(*queues):
            yield from (seq for seq in round_ if seq is not None)

"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step is one flattened token batch under `max_batch_tokens`: first every running sequence (a decode token, or
the next chunk of an unfinished prefill), then newly admitted ones, while there are free blocks for their prompt and
fewer than `max_num_seqs` run. When a running sequence needs a block and none is free, the most recently admitted
sequence is preempted by recompute: its blocks are freed and it returns to the head of the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
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
    ) -> None:
        self.on_admit = on_admit
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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.num_preempted:
            seq = self.waiting[0]
            if self.blocks.blocks_needed(seq, seq.num_tokens) > self.blocks.num_blocks:
                self.finish(seq, FinishReason.LENGTH)  # could never fit, even alone
                out.finished.append(seq)
                continue
            if not self.blocks.can_grow(seq, seq.num_tokens) or not self.on_admit(seq):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            (out.decodes if n == 1 and seq.num_uncomputed == 1 else out.prefills).append(ScheduledSeq(seq, n))
            budget -= n
        return out

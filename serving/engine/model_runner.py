"""Turn a scheduled step into tensors, run the model once, and return the logits of the rows that sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchboard.adapters_store.kinds import AdapterKind
from switchboard.kernels.backend import AdapterKernels

from ..adapter_cache import AdapterSlots
from ..models.attention import AttentionMetadata, KVCache, build_group
from ..models.linear import LinearDeltas
from ..models.llama import LlamaModel
from .adapter_batch import AdapterBatch
from .scheduler import ScheduledSeq, SchedulerOutput
from .sequence import Sequence

# Kinds that act inside the linears (prefix acts through the KV cache instead).
LINEAR_KINDS = (AdapterKind.LORA, AdapterKind.KRONA, AdapterKind.IA3)


@dataclass(frozen=True, slots=True)
class PromptLogprobSpan:
    """Prompt positions of one sequence whose next (prompt) token this step scores: `start` .. `start + count - 1`,
    at rows `row` .. `row + count - 1` of the step's flattened batch."""

    seq: Sequence
    start: int
    count: int
    row: int


def prompt_logprob_spans(step: SchedulerOutput) -> list[PromptLogprobSpan]:
    """The spans of the step's sequences that want prompt logprobs (echo with logprobs) and reach prompt positions
    not scored yet (a sequence recomputed after preemption scores nothing twice). Rows follow `prepare`'s order."""
    spans = []
    row = 0
    for s in step.decodes + step.prefills:
        seq = s.seq
        if seq.prompt_logprobs is not None:
            first = max(seq.num_computed, len(seq.prompt_logprobs) - 1)
            end = min(seq.num_computed + s.num_tokens, len(seq.prompt_token_ids) - 1)
            if end > first:
                spans.append(PromptLogprobSpan(seq, first, end - first, row + first - seq.num_computed))
        row += s.num_tokens
    return spans


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        device: torch.device,
        adapter_slots: AdapterSlots | None = None,
        kernels: AdapterKernels | None = None,
    ) -> None:
        self.model = model
        self.adapter_slots = adapter_slots
        self.kernels = kernels
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self._last_batch: tuple[tuple[object, ...], AdapterBatch | None] | None = None  # (key, batch) of the last step

    def adapter_batch(self, step: SchedulerOutput) -> LinearDeltas | None:
        """The step's per-token adapter slots per kind, as segments shared by every linear; None if unused."""
        if self.adapter_slots is None or self.kernels is None:
            return None
        scheduled = step.scheduled
        # The batch is a pure function of this key, and steady decoding repeats it step after step: reuse it then
        # (building the segments is about 0.1 ms a step; slot weights are looked up live, so reuse stays exact).
        key = tuple((s.seq.adapter_kind, s.seq.adapter_slot, s.num_tokens) for s in scheduled)
        if self._last_batch is not None and self._last_batch[0] == key:
            return self._last_batch[1]
        batch = self._build_adapter_batch(scheduled)
        self._last_batch = (key, batch)
        return batch

    def _build_adapter_batch(self, scheduled: list[ScheduledSeq]) -> AdapterBatch | None:
        if not any(s.seq.adapter_kind in LINEAR_KINDS for s in scheduled):
            return None
        token_slots: dict[AdapterKind, list[int]] = {kind: [] for kind in LINEAR_KINDS}
        for s in scheduled:
            for kind, slots in token_slots.items():
                slots.extend([s.seq.adapter_slot if s.seq.adapter_kind is kind else -1] * s.num_tokens)
        return AdapterBatch(self.adapter_slots, self.kernels, token_slots, self.device)

    def prepare(self, step: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """input_ids [T], positions [T], attention metadata, and the token rows whose logits are sampled."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        groups = []
        bs = self.block_size
        for part in (step.decodes, step.prefills):
            if not part:
                continue
            start = len(ids)
            q_lens, ctx_lens, tables = [], [], []
            for s in part:
                seq, n = s.seq, s.num_tokens
                first = seq.num_computed
                ids.extend(seq.token_ids[first : first + n])
                pos = range(seq.prefix_len + first, seq.prefix_len + first + n)
                positions.extend(pos)
                table = seq.block_table
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
                if s.samples:
                    sample_rows.append(len(ids) - 1)
                q_lens.append(n)
                ctx_lens.append(seq.prefix_len + first + n)
                tables.append(table)
            groups.append(build_group(start, q_lens, ctx_lens, tables, bs, self.device, self.kv_cache.pad_slot))
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), groups=groups)
        return (
            torch.tensor(ids, device=dev),
            torch.tensor(positions, device=dev),
            meta,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),  # long even when empty (no row samples)
        )

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> torch.Tensor:
        """Logits [N + R, vocab] (float32): first the N scheduled sequences that sample, in `step.scheduled` order,
        then the R prompt positions of `prompt_logprob_spans(step)`, span after span."""
        input_ids, positions, meta, sample_rows = self.prepare(step)
        hidden = self.model(input_ids, positions, self.kv_cache.data, meta, self.adapter_batch(step))
        spans = prompt_logprob_spans(step)
        if spans:
            extra = [torch.arange(sp.row, sp.row + sp.count, device=self.device) for sp in spans]
            sample_rows = torch.cat([sample_rows, *extra])
        return self.model.logits(hidden[sample_rows])

"""Turn a scheduled step into tensors, run the model once, and return the logits of the rows that sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import ServedAdapters
from ..models.attention import AttentionMetadata, KVCache, build_group
from ..models.llama import LlamaModel
from .scheduler import SchedulerOutput
from .sequence import Sequence


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
        self, model: LlamaModel, kv_cache: KVCache, device: torch.device, adapters: ServedAdapters | None = None
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device

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
        deltas = None if self.adapters is None else self.adapters.batch(step.scheduled)
        hidden = self.model(input_ids, positions, self.kv_cache.data, meta, deltas)
        spans = prompt_logprob_spans(step)
        if spans:
            extra = [torch.arange(sp.row, sp.row + sp.count, device=self.device) for sp in spans]
            sample_rows = torch.cat([sample_rows, *extra])
        return self.model.logits(hidden[sample_rows])

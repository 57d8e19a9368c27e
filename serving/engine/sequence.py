"""One generated continuation (a choice) of a request, with its place in the KV cache."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from switchboard.adapters_store.kinds import Adapter, AdapterKind

from .detokenizer import IncrementalDetokenizer
from .guided import GuidedState
from .request import FinishReason, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # choice number within the request
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None  # None: the API process detokenizes (engine core process)
    adapter_id: str | None = None
    adapter: Adapter | None = None  # the parsed adapter it runs on (None: the base model or a merged adapter)
    adapter_kind: AdapterKind | None = None
    adapter_slot: int = -1  # device slot of its adapter while running (-1: none, or not resident)
    prefix_len: int = 0  # cache positions filled by a prefix adapter before the first real token
    prefix_written: bool = False  # the prefix keys and values are in this sequence's blocks
    generator: torch.Generator | None = None
    guided: GuidedState | None = None  # its place in the request's grammar (structured output)
    tenant: str = ""  # fair admission takes turns over tenants
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache (prefix positions not counted)
    finish_reason: FinishReason | None = None
    error: str | None = None  # why it failed, with finish_reason ERROR
    # Output not yet handed to the caller
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    # Logprobs of the prompt's tokens (echo with logprobs): None unless asked for; then [None] (the first token has
    # no context) plus one entry per position scored so far. Handed out once, with the first output.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def cache_len(self, num_tokens: int) -> int:
        """Cache positions needed to hold the prefix and `num_tokens` real tokens."""
        return self.prefix_len + num_tokens

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget the cache; prompt and generated tokens are recomputed on return."""
        self.block_table = []
        self.num_computed = 0
        self.prefix_written = False
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING

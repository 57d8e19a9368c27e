"""What a caller hands the engine and what it gets back: plain dataclasses, no torch.

The API layer builds a `SamplingParams` from an OpenAI request and reads `RequestOutput` deltas back; the engine
never sees HTTP and the API never sees blocks or tensors.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled (client gone) or the engine shut down
    ERROR = "error"  # this sequence alone failed in a step (`RequestOutput.error` says why); the batch went on


class EngineOverloaded(RuntimeError):
    """The waiting queue is at its bound; the API answers 429 with Retry-After."""

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__("the server is overloaded: too many requests are waiting")
        self.retry_after_s = retry_after_s


class EngineUnavailable(RuntimeError):
    """The engine core process is gone (crashed or killed): requests fail with 503 until the server restarts."""


# Temperatures below this sample greedily (vLLM's rule): dividing logits by less overflows float32.
GREEDY_TEMPERATURE = 1e-5
# What torch.Generator.manual_seed accepts; the n choices of a request use seed, seed + 1, ... seed + n - 1.
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics; `temperature == 0` means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob plus the top k
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= self.seed + self.n - 1 <= SEED_RANGE[1]:
            raise ValueError(f"seed must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]} - (n - 1)]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass(slots=True)
class TokenLogprob:
    """The sampled token's log-probability and the `k` most likely alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class RequestOutput:
    """One step's news for one choice of a request: the text and tokens added since the previous output.

    `new_text` holds only completely decoded characters (a byte-level tokenizer can end a step inside a UTF-8
    sequence; those bytes are held back until they decode), and never contains a stop string.
    """

    request_id: str
    index: int  # which of the n choices
    new_text: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # why the choice failed, with finish_reason ERROR

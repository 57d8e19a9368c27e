"""What a caller hands the engine and what it gets back: plain dataclasses, no torch.

The API layer builds a `SamplingParams` from an OpenAI request and reads `RequestOutput` deltas back; the engine
never sees HTTP and the API never sees blocks or tensors.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .guided import Grammar


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled (client gone) or the engine shut down
    ERROR = "error"  # this sequence alone failed in a step (`RequestOutput.error` says why); the batch went on


class AdapterInput(enum.Enum):
    """What an engine takes with a request for an uploaded adapter version: the parsed tensors (the API's host tier
    parses them) or the version's PEFT directory in the store (an engine that loads adapters itself, like vLLM)."""

    PARSED = "parsed"
    DIRECTORY = "directory"


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
    # vLLM's sampling extensions (logits_processors.py, sampler.py); the defaults change nothing.
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    min_tokens: int = 0  # EOS, stop tokens and stop strings cannot end the output before this many tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] = field(default_factory=list)  # empty: every token
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # each never completed in the output
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # logprobs of each prompt token (and the top k) given the ones before it
    guided: Grammar | None = None  # structured output: each choice's tokens follow this compiled grammar

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
        self._check_vllm_fields()
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= self.seed + self.n - 1 <= SEED_RANGE[1]:
            raise ValueError(f"seed must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]} - (n - 1)]")

    def _check_vllm_fields(self) -> None:
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError("repetition_penalty must be a finite number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens] (max_tokens is {self.max_tokens})")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError("prompt_logprobs must be between 0 and 20")
        if any(not word for word in self.bad_words_token_ids):
            raise ValueError("a bad word must have at least one token")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether any of the repetition, presence or frequency penalties is on."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor (logits_processors.py) acts on this request's rows."""
        return (
            self.penalized
            or self.min_tokens > 0
            or bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)
        )


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
    # With SamplingParams.prompt_logprobs, in the choice's first output: None for the first prompt token, then each
    # prompt token's logprob given the ones before it.
    prompt_logprobs: list[TokenLogprob | None] | None = None

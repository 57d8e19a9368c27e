"""Request bodies of the OpenAI-compatible routes (pydantic), with OpenAI's field names and defaults.

Unknown fields are ignored, as OpenAI clients send many optional ones. Fields we know but do not implement (`echo`,
penalties, `logit_bias`, `tools`, ...) are declared so that a non-default value is refused with a clear 400 instead
of being silently ignored (see `unsupported_fields`). Range checks that pydantic expresses well live here; the rest
(prompt length against the context window, token ids against the vocabulary) needs the tokenizer and lives in
`prompts.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Every list stops validating at its first wrong item (`FAIL_FAST`): a body of a million wrong items (within
# --max-request-bytes) would otherwise make pydantic build a million errors, seconds of work holding the GIL, and a
# response of megabytes. Valid bodies validate as before, and the JSON schema is unchanged.
FAIL_FAST = Field(fail_fast=True)
StopField = str | Annotated[list[str], FAIL_FAST] | None
# A completion prompt: one text, several texts, one token-id list, or several token-id lists.
PromptField = (
    str
    | Annotated[list[str], FAIL_FAST]
    | Annotated[list[int], FAIL_FAST]
    | Annotated[list[Annotated[list[int], FAIL_FAST]], FAIL_FAST]
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both generation routes share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM extension; -1 or 0 disables
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: StopField = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], FAIL_FAST] | None = None  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM extension (benchmarks)
    adapter_id: str | None = None  # Switchboard extension
    user: str | None = None
    # Known but not implemented: refused when set to anything but their default.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Values not validated: any non-empty map is refused, and a map of a million wrong values would be a million errors.
    logit_bias: dict[str, Any] | None = None

    def unsupported_fields(self) -> list[str]:
        """Names of fields that are set to a value this server does not implement."""
        return [name for name, ok in self._unsupported().items() if getattr(self, name) not in ok]

    def _unsupported(self) -> dict[str, tuple[Any, ...]]:
        """Field name -> the values that mean "not used"."""
        return {
            "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0),
            "logit_bias": (None, {}),
        }

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]


class CompletionRequest(SamplingFields):
    prompt: PromptField
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # null: OpenAI's default, 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def _unsupported(self) -> dict[str, tuple[Any, ...]]:
        return super()._unsupported() | {"echo": (False,), "suffix": (None, ""), "best_of": (None, 1, self.n)}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], FAIL_FAST] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1), FAIL_FAST]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[dict[str, Any]], FAIL_FAST] | None = None
    response_format: dict[str, Any] | None = None

    def _unsupported(self) -> dict[str, tuple[Any, ...]]:
        return super()._unsupported() | {"tools": (None, []), "response_format": (None, {"type": "text"})}

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the current name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """The engine's `logprobs` (top-k count), or None when the caller wants none."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

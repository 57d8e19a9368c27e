"""Request bodies of the OpenAI-compatible routes (pydantic), with OpenAI's field names and defaults.

Unknown fields are ignored, as OpenAI clients send many optional ones. Fields we know but do not implement (`echo`,
penalties, `logit_bias`, `tools`, ...) are declared so that a non-default value is refused with a clear 400 instead
of being silently ignored (see `unsupported_fields`); the OpenAPI document lists the values they accept. Range checks
that pydantic expresses well live here; the rest (an empty prompt, prompt length against the context window, token
ids against the vocabulary) lives in `prompts.py`, where it has the tokenizer and its own messages; the document
states what of it a schema can (a prompt is never empty).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from switchboard.serving.api.guided_fields import GuidedFields


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# The bodies are validated strictly, so that what the OpenAPI document calls invalid is refused: pydantic's lax mode
# would take "3" or true for an integer and 0 or "yes" for a boolean. A float with no fraction is still an integer,
# as JSON Schema has it (3.0).
Int = Annotated[int, BeforeValidator(_integral)]
STRICT = ConfigDict(extra="ignore", strict=True)

# Every list stops validating at its first wrong item (`FAIL_FAST`): a body of a million wrong items (within
# --max-request-bytes) would otherwise make pydantic build a million errors, seconds of work holding the GIL, and a
# response of megabytes. Valid bodies validate as before.
FAIL_FAST = Field(fail_fast=True)
StopField = str | Annotated[list[str], FAIL_FAST] | None
_TEXT: dict[str, Any] = {"type": "string", "minLength": 1}
_TOKEN_IDS: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# A completion prompt: one text, several texts, one token-id list, or several token-id lists; never empty (checked
# in prompts.py, which says so more plainly than a union's validation errors would).
PromptField = Annotated[
    str
    | Annotated[list[str], FAIL_FAST]
    | Annotated[list[Int], FAIL_FAST]
    | Annotated[list[Annotated[list[Int], FAIL_FAST]], FAIL_FAST],
    WithJsonSchema(
        {
            "title": "Prompt",
            "anyOf": [
                _TEXT,
                {"type": "array", "items": _TEXT, "minItems": 1},
                _TOKEN_IDS,
                {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
            ],
        }
    ),
]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


def _document_unsupported(schema: dict[str, Any], model: type[SamplingFields]) -> None:
    """In the JSON schema, an unsupported field accepts only the values that mean "not used"."""
    for name, ok in model.UNSUPPORTED.items():
        schema["properties"][name] = {"title": schema["properties"][name].get("title", name), "enum": list(ok)}


class SamplingFields(GuidedFields):
    """The fields both generation routes share (structured output's in `GuidedFields`)."""

    model_config = ConfigDict(**STRICT, json_schema_extra=_document_unsupported)
    # Known but not implemented: field -> the values that mean "not used"; any other value is refused (400).
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
        "logit_bias": (None, {}),
    }

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[Int, Field(ge=-1)] | None = None  # vLLM extension; -1 or 0 disables
    n: Annotated[Int, Field(ge=1, le=128)] = 1
    stop: StopField = None
    stop_token_ids: Annotated[list[Annotated[Int, Field(ge=0)]], FAIL_FAST] | None = None  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Int | None = None
    ignore_eos: bool = False  # vLLM extension (benchmarks)
    adapter_id: str | None = None  # Switchboard extension
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Values not validated: any non-empty map is refused, and a map of a million wrong values would be a million errors.
    logit_bias: dict[str, Any] | None = None

    def unsupported_fields(self) -> list[str]:
        """Names of fields that are set to a value this server does not implement."""
        return [name for name, ok in self.UNSUPPORTED.items() if getattr(self, name) not in ok]

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
    max_tokens: Annotated[Int, Field(ge=1)] | None = 16  # null: OpenAI's default, 16
    logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = None
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = SamplingFields.UNSUPPORTED | {
        "echo": (False,),
        "suffix": (None, ""),
        "best_of": (None, 1),
    }

    def unsupported_fields(self) -> list[str]:
        # `best_of` equal to `n` asks for nothing but plain sampling.
        return [name for name in super().unsupported_fields() if not (name == "best_of" and self.best_of == self.n)]


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

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
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[dict[str, Any]], FAIL_FAST] | None = None
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = SamplingFields.UNSUPPORTED | {"tools": (None, [])}

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the current name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """The engine's `logprobs` (top-k count), or None when the caller wants none."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

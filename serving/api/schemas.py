"""Request bodies of the OpenAI-compatible routes (pydantic), with OpenAI's field names and defaults.

Unknown fields are ignored, as OpenAI clients send many optional ones. Fields we know but do not implement (`suffix`,
`best_of` above `n`, beam search, `tools`, ...) are declared so that a non-default value is refused with a 400 that
says why instead of being silently ignored (see `unsupported_fields` and `REASONS`); the OpenAPI document lists the
values they accept. docs/api.md has the table of every vLLM field, applied or refused. Range checks
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
# Every step checks each running sequence's new text against each of its stop strings and its token against each
# stop token id: half a million of either (within --max-request-bytes) slowed every tenant's decode. vLLM sets no
# bound; OpenAI allows 4 stop strings.
MAX_STOPS = 1024
StopField = str | Annotated[list[str], Field(max_length=MAX_STOPS), FAIL_FAST] | None
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


MAX_BAD_WORDS = 1024
BadWords = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_BAD_WORDS), FAIL_FAST]
_LOGIT_BIAS: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": "^[0-9]+$"},  # token ids
    "additionalProperties": {"type": "number"},  # clamped to [-100, 100], as vLLM does
    "title": "Logit Bias",
}


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
    # Known but not implemented: field -> the values that mean "not used"; any other value is refused (400), with
    # the field's reason from REASONS.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "spaces_between_special_tokens": (None, True),
        "use_beam_search": (None, False),
        "length_penalty": (None, 1, 1.0),
        "truncate_prompt_tokens": (None,),
        "prompt_logprobs": (None,),
        "priority": (None, 0),
        "logits_processors": (None, []),
        "return_tokens_as_token_ids": (None, False),
    }
    REASONS: ClassVar[dict[str, str]] = {
        "spaces_between_special_tokens": "special tokens decode through the model's fast tokenizer, which always "
        "joins them without spaces (vLLM's fast-tokenizer path does the same)",
        "use_beam_search": "this server samples; it has no beam search",
        "length_penalty": "it only applies to beam search, which this server does not have",
        "truncate_prompt_tokens": "prompts are never truncated here; a prompt past the context is refused instead",
        "prompt_logprobs": "ask for `echo` with `logprobs` on /v1/completions for the prompt's logprobs",
        "priority": "the scheduler admits requests in arrival order, taking turns over tenants; it has no priorities",
        "logits_processors": "this server runs no code named in a request",
        "return_tokens_as_token_ids": "logprobs name tokens by their text",
        "best_of": "returning the best of several candidates is not implemented; set `best_of` to `n` or leave it "
        "unset",
        "suffix": "inserting text before a suffix needs a fill-in-the-middle model; this one has none",
        "echo": "echoing the last message is a completions feature here; use /v1/completions with `echo`",
        "tools": "tool calling is not implemented",
    }

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[Int, Field(ge=-1)] | None = None  # vLLM extension; -1 or 0 disables
    n: Annotated[Int, Field(ge=1, le=128)] = 1
    stop: StopField = None
    stop_token_ids: Annotated[list[Annotated[Int, Field(ge=0)]], Field(max_length=MAX_STOPS), FAIL_FAST] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Int | None = None
    ignore_eos: bool = False  # vLLM extension (benchmarks)
    adapter_id: str | None = None  # Switchboard extension
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    # Keys and values are checked in sampling.py, stopping at the first wrong one (a map of a million wrong values
    # would otherwise be a million errors); the document states what they must be.
    logit_bias: Annotated[dict[str, Any], WithJsonSchema(_LOGIT_BIAS)] | None = None
    # vLLM's sampling extensions
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    min_tokens: Annotated[Int, Field(ge=0)] = 0
    include_stop_str_in_output: bool = False
    # Each step checks every bad word against the output's end: bounded, so that one request cannot stall the batch.
    bad_words: BadWords | None = None
    allowed_token_ids: Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1), FAIL_FAST] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    truncate_prompt_tokens: Int | None = None
    prompt_logprobs: Int | None = None
    priority: Int | None = None
    logits_processors: Annotated[list[Any], FAIL_FAST] | None = None
    return_tokens_as_token_ids: bool | None = None

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
        "suffix": (None, ""),
        "best_of": (None, 1),
    }

    def unsupported_fields(self) -> list[str]:
        # `best_of` equal to `n` asks for nothing but plain sampling.
        return [name for name in super().unsupported_fields() if not (name == "best_of" and self.best_of == self.n)]

    def prompt_logprobs_k(self) -> int | None:
        """With `echo` and `logprobs`, the prompt's tokens get logprobs too (the top `logprobs` of each)."""
        return self.logprobs if self.echo and self.logprobs is not None else None


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
    echo: bool = False
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = SamplingFields.UNSUPPORTED | {
        "tools": (None, []),
        "echo": (False,),
    }

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the current name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """The engine's `logprobs` (top-k count), or None when the caller wants none."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

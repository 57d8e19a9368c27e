"""vLLM's sampling fields of a request body, checked against the tokenizer and turned into `SamplingParams` fields.

What a schema cannot state is checked here, each with a 400 naming the field: `logit_bias` keys are token ids in the
vocabulary (values clamped to [-100, 100], as vLLM does), `allowed_token_ids` lie in the vocabulary, and each of
`bad_words` is tokenized as vLLM does (alone, and after a space when that gives a different first token of the same
length), so that the word is banned at the start of the text and inside it. Runs in the request worker: a body may
carry many words to tokenize.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from switchboard.serving.api.errors import bad_request
from switchboard.serving.api.schemas import SamplingFields

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range; vLLM clamps to it


def logit_bias(raw: dict[str, Any] | None, vocab_size: int) -> dict[int, float]:
    """`{"token id": bias}` as ints and floats; 400 at the first key that is no token id or value that is no number."""
    out: dict[int, float] = {}
    for key, value in (raw or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise bad_request(
                f"`logit_bias` key {key[:40]!r} is not a token id: keys are token ids in [0, {vocab_size}) written as "
                "strings.",
                param="logit_bias",
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(
                f"`logit_bias` value for token {key} must be a number, not {type(value).__name__}.", param="logit_bias"
            )
        out[int(key)] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))
    return out


def bad_words_token_ids(words: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each word's token ids alone and, when it tokenizes differently but as long, after a space (vLLM's rule)."""
    out: list[list[int]] = []
    for word in words:
        alone = tokenizer.encode(word, add_special_tokens=False)
        if not alone:
            raise bad_request(f"`bad_words` entry {word[:40]!r} has no tokens.", param="bad_words")
        out.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return out


def vllm_fields(body: SamplingFields, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The `SamplingParams` keyword arguments for vLLM's sampling fields of `body` (defaults where unset)."""
    vocab_size = len(tokenizer)
    allowed = sorted(set(body.allowed_token_ids or ()))  # at most the vocabulary, however long the list
    if any(t >= vocab_size for t in allowed):
        bad = next(t for t in allowed if t >= vocab_size)
        raise bad_request(
            f"`allowed_token_ids` holds {bad}, outside the vocabulary [0, {vocab_size}).", param="allowed_token_ids"
        )
    return {
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "min_p": body.min_p or 0.0,
        "min_tokens": body.min_tokens,
        "logit_bias": logit_bias(body.logit_bias, vocab_size),
        "allowed_token_ids": allowed,
        "bad_words_token_ids": bad_words_token_ids(body.bad_words or [], tokenizer),
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
    }

"""From a request's prompt or messages to validated token ids, and the token budget each prompt may use.

Everything here raises `ApiError` (400) with OpenAI's messages; nothing touches the engine. It runs in the request
worker (`body.RequestWorker`), beside the engine's step thread: a text that cannot fit the context is refused from a
count of the tokens of its beginning, made without the GIL, never tokenized whole into a list of Python ints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from switchboard.serving.api.errors import ApiError, bad_request, check_text
from switchboard.serving.api.schemas import ChatMessage, PromptField

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass(frozen=True, slots=True)
class Budget:
    """The context a prompt must fit: `max_model_len` tokens, `max_tokens` of them for the completion (None: the
    rest of the context, chat's default). `what` names the prompt in messages: "prompt" or "messages"."""

    max_tokens: int | None
    max_model_len: int
    what: str

    def completion_tokens(self, prompt_len: int) -> int:
        """The tokens to generate after a prompt of `prompt_len` tokens; 400 if it cannot fit."""
        return completion_budget(prompt_len, self.max_tokens, self.max_model_len, what=self.what)


def prompt_batch(prompt: PromptField) -> Sequence[str | list[int]]:
    """The prompts of a completions request: one text, one token-id list, several of either."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):  # validated: a list of one kind
        return [prompt]  # type: ignore[list-item]  # one prompt given as token ids
    return prompt  # type: ignore[return-value]  # several texts or several token-id lists


def completion_prompts(prompt: PromptField, tokenizer: PreTrainedTokenizerBase, budget: Budget) -> list[list[int]]:
    """One token-id list per prompt, each within `budget`. Texts are tokenized as the tokenizer expects (its special
    tokens added). A prompt past the context is refused before its token ids are checked against the vocabulary."""
    batch = prompt_batch(prompt)
    if not batch or "" in batch:  # "" is empty even if the tokenizer would add a BOS
        raise bad_request("The prompt must not be empty.", param="prompt")
    for item in batch:
        if isinstance(item, str):
            check_text(item, param="prompt")
    prompts = []
    for item in batch:
        ids = _encode(tokenizer, item, budget) if isinstance(item, str) else item
        budget.completion_tokens(len(ids))
        check_token_ids(ids, tokenizer, param="prompt")
        prompts.append(list(ids))
    return prompts


def chat_prompt(messages: Sequence[ChatMessage], tokenizer: PreTrainedTokenizerBase, budget: Budget) -> list[int]:
    """Render `messages` with the model's chat template and tokenize the result with exactly one BOS; a conversation
    that cannot fit `budget` is refused without its token ids (the caller checks the budget of the ids returned).

    A template that writes the BOS text itself is tokenized without special tokens; otherwise the tokenizer adds
    what it normally adds. A doubled BOS (template and tokenizer both adding it) is collapsed to one.
    """
    for message in messages:
        check_text(message.text(), param="messages")
        check_text(message.name or "", param="messages")
    conversation = [_template_message(message) for message in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise bad_request(
            f"The messages could not be rendered with the model's chat template: {exc}", param="messages"
        ) from exc
    except ValueError as exc:  # transformers: the tokenizer has no chat template
        raise bad_request(f"This model cannot serve chat completions: {exc}", param="messages") from exc
    assert isinstance(text, str)
    bos_text = tokenizer.bos_token
    template_wrote_bos = isinstance(bos_text, str) and bool(bos_text) and text.startswith(bos_text)
    ids = _encode(tokenizer, text, budget, add_special_tokens=not template_wrote_bos)
    bos_id = tokenizer.bos_token_id
    while bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        ids = ids[1:]
    check_token_ids(ids, tokenizer, param="messages")
    return ids


def _encode(
    tokenizer: PreTrainedTokenizerBase, text: str, budget: Budget, *, add_special_tokens: bool = True
) -> list[int]:
    """`tokenizer.encode(text)`; 400 `context_length_exceeded` first when a count of tokens shows that the text
    cannot fit, made without building the ids (a text of megabytes: its list of ids held the GIL for long)."""
    if len(text) > budget.max_model_len and isinstance(tokenizer, PreTrainedTokenizerFast):
        at_least = _count_at_least(tokenizer, text, budget.max_model_len, add_special_tokens=add_special_tokens)
        if at_least > budget.max_model_len:  # no completion fits, whatever `max_tokens` is
            raise _context_error(
                f"This model's maximum context length is {budget.max_model_len} tokens. However, your "
                f"{budget.what} resulted in at least {at_least} tokens. Please reduce the length of the {budget.what}.",
                budget.what,
            )
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _count_at_least(tokenizer: PreTrainedTokenizerFast, text: str, limit: int, *, add_special_tokens: bool) -> int:
    """A lower bound of the number of tokens of `text`, exact when it is at most `limit`.

    Counts the tokens of ever longer beginnings of the text (from 4 characters a token of `limit` up, doubling),
    each ending before a space, until one has more than `limit` tokens: a text of megabytes is refused after
    tokenizing a few times `limit` tokens' worth, not all of it. A beginning that ends before a space tokenizes as
    the start of the whole text does, under every tokenizer that splits words at spaces before merging (byte-level
    BPE, SentencePiece's metaspace, WordPiece), so its count never exceeds the whole text's. The Rust tokenizer's
    batch call releases the GIL, and `len` of its encoding builds no Python ints.
    """
    backend = tokenizer.backend_tokenizer
    size = 4 * limit
    while size < len(text):
        cut = text.rfind(" ", 0, size)
        if cut <= 0:  # no space to cut before: count it all
            break
        (encoding,) = backend.encode_batch_fast([text[:cut]], add_special_tokens=add_special_tokens)
        if len(encoding) > limit:
            return len(encoding)
        size *= 2
    (encoding,) = backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)
    return len(encoding)


def _template_message(message: ChatMessage) -> dict[str, str]:
    # Most templates know "system" but not OpenAI's newer "developer" role, which means the same.
    role = "system" if message.role == "developer" else message.role
    rendered = {"role": role, "content": message.text()}
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def check_token_ids(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, *, param: str) -> None:
    if not ids:
        raise bad_request("The prompt must not be empty.", param=param)
    vocab_size = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise bad_request(f"Token id {bad[0]} is out of the vocabulary [0, {vocab_size}).", param=param)


def completion_budget(prompt_len: int, max_tokens: int | None, max_model_len: int, *, what: str) -> int:
    """The number of tokens to generate after a prompt of `prompt_len` tokens; 400 if it cannot fit.

    `max_tokens=None` means "the rest of the context window" (chat's default). `what` names the prompt in the
    message ("prompt" or "messages"), as OpenAI does.
    """
    if max_tokens is None:
        if prompt_len >= max_model_len:
            raise _context_error(
                f"This model's maximum context length is {max_model_len} tokens. However, your {what} resulted "
                f"in {prompt_len} tokens. Please reduce the length of the {what}.",
                what,
            )
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise _context_error(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            what,
        )
    return max_tokens


def _context_error(message: str, what: str) -> ApiError:
    return bad_request(message, param=what, code=CONTEXT_LENGTH_EXCEEDED)

"""Response bodies and stream chunks of the two generation routes, in OpenAI's shapes.

`ChoiceState` accumulates one choice's outputs (text, logprobs, finish reason, token count); `CompletionFormat`
(`text_completion`, completions-style logprobs) and `ChatFormat` (`chat.completion`, chat-style logprobs) turn
states and deltas into JSON-ready dicts. Both formats share one interface, so the route code is written once.
"""

from __future__ import annotations

import codecs
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from switchboard.serving.engine.request import FinishReason, RequestOutput, TokenLogprob

# JSON has no -inf; OpenAI-compatible servers (vLLM) clamp to this.
_MIN_LOGPROB = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 bytes), inverted: character -> byte."""
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code_points = list(byte_values)  # printable bytes stand for themselves
    others = [b for b in range(256) if b not in byte_values]
    byte_values += others
    code_points += [256 + i for i in range(len(others))]  # the others get code points from 256 up, in byte order
    return {chr(c): b for b, c in zip(byte_values, code_points, strict=True)}


class TokenTexts:
    """How logprobs name single tokens (cached per token id).

    `text` is the token's text, or OpenAI's `bytes:\\xNN...` form for a token that holds only part of a UTF-8
    character (so that distinct partial tokens never share a name); `bytes` are its exact UTF-8 bytes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> bytes:
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[str, bytes]:
        if token_id not in self._cache:
            text = self._tokenizer.decode([token_id])
            if "\ufffd" in text and (raw := self._piece_bytes(token_id)) is not None:
                text = raw.decode("utf-8") if _is_utf8(raw) else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
                self._cache[token_id] = (text, raw)
            else:
                self._cache[token_id] = (text, text.encode("utf-8"))
        return self._cache[token_id]

    def _piece_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes behind a vocabulary piece (byte-level BPE, or a SentencePiece byte-fallback token)."""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str) or not piece:
            return None
        if match := _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        alphabet = _byte_level_alphabet()
        if all(ch in alphabet for ch in piece):
            return bytes(alphabet[ch] for ch in piece)
        return None


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _logprob(value: float) -> float:
    if math.isnan(value):  # JSON carries neither NaN nor -inf
        return _MIN_LOGPROB
    return max(value, _MIN_LOGPROB)


# A logprobs entry: a token with its logprob and alternatives, or a bare token id (the first token of an echoed
# prompt, which has no context and so no logprob: rendered as null, as vLLM does).
Entry = TokenLogprob | int


@dataclass(frozen=True, slots=True)
class Echo:
    """The prompt a completions choice starts with (`echo`): its text and its token ids."""

    text: str
    token_ids: list[int]


def echo_prompts(prompt: Any, token_ids: list[list[int]], tokenizer: PreTrainedTokenizerBase, n: int) -> list[Echo]:
    """One `Echo` per choice (`n` per prompt, in the response's order): a text prompt echoes as written, a token-id
    prompt as its decoded text (vLLM's rule)."""
    if isinstance(prompt, str):
        written: list[str | None] = [prompt]
    elif prompt and isinstance(prompt[0], str):
        written = list(prompt)
    else:
        written = [None] * len(token_ids)
    echoes = [
        Echo(text if text is not None else tokenizer.decode(ids), ids)
        for text, ids in zip(written, token_ids, strict=True)
    ]
    return [e for e in echoes for _ in range(n)]


@dataclass(slots=True)
class Delta:
    """What one output adds to a choice."""

    text: str
    logprobs: list[Entry]
    text_offsets: list[int]  # offset of each token of `logprobs` in the choice's text
    finish_reason: str | None


@dataclass(slots=True)
class ChoiceState:
    """Everything one choice has produced so far; with `echo`, its prompt comes first (in the first delta)."""

    echo: Echo | None = None
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[Entry] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    # Token offsets: characters completed by the tokens so far (a character split over tokens belongs at the
    # offset where it starts).
    _utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    _chars: int = 0
    _started: bool = False

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def update(self, output: RequestOutput, texts: TokenTexts) -> Delta:
        text, entries, offsets = "", [], []
        if not self._started:
            self._started = True
            if self.echo is not None:
                text, entries, offsets = self._echoed(self.echo, output, texts)
        for entry in output.logprobs or ():
            offsets.append(self._chars)
            self._chars += len(self._utf8.decode(texts.bytes(entry.token_id)))
            entries.append(entry)
        text += output.new_text
        finish = _finish_reason(output.finish_reason) if output.finished else None
        self.text_parts.append(text)
        self.logprobs.extend(entries)
        self.text_offsets.extend(offsets)
        self.finish_reason = finish
        self.completion_tokens = output.completion_tokens
        return Delta(text, entries, offsets, finish)

    def _echoed(self, echo: Echo, output: RequestOutput, texts: TokenTexts) -> tuple[str, list[Entry], list[int]]:
        """The prompt's text and, when the engine scored it (logprobs asked for), its tokens' entries and offsets;
        the generated tokens' offsets then start after the prompt's text."""
        entries: list[Entry] = []
        offsets: list[int] = []
        if output.prompt_logprobs is not None:
            for token, entry in zip(echo.token_ids, output.prompt_logprobs, strict=True):
                offsets.append(self._chars)
                self._chars += len(self._utf8.decode(texts.bytes(token)))
                entries.append(token if entry is None else entry)
        self._utf8.reset()
        self._chars = len(echo.text)
        return echo.text, entries, offsets


def _finish_reason(reason: FinishReason | None) -> str:
    return reason.value if reason is not None else FinishReason.STOP.value


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseFormat(Protocol):
    id_prefix: str
    object: str
    chunk_object: str
    wants_logprobs: bool

    def new_state(self, index: int) -> ChoiceState: ...

    def choice(self, index: int, state: ChoiceState) -> dict[str, Any]: ...

    def opening_chunk_choice(self, index: int) -> dict[str, Any] | None: ...

    def chunk_choice(self, index: int, delta: Delta) -> dict[str, Any]: ...


class CompletionFormat:
    """`/v1/completions`: `text_completion` objects, completions-style logprobs."""

    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, texts: TokenTexts, wants_logprobs: bool, echo: list[Echo] | None = None) -> None:
        """`echo`: each choice's prompt, which its text (and logprobs) then start with."""
        self._texts = texts
        self.wants_logprobs = wants_logprobs
        self._echo = echo

    def new_state(self, index: int) -> ChoiceState:
        return ChoiceState(echo=self._echo[index] if self._echo is not None else None)

    def choice(self, index: int, state: ChoiceState) -> dict[str, Any]:
        return {
            "index": index,
            "text": state.text,
            "logprobs": self._logprobs(state.logprobs, state.text_offsets),
            "finish_reason": state.finish_reason,
        }

    def opening_chunk_choice(self, index: int) -> dict[str, Any] | None:
        return None

    def chunk_choice(self, index: int, delta: Delta) -> dict[str, Any]:
        return {
            "index": index,
            "text": delta.text,
            "logprobs": self._logprobs(delta.logprobs, delta.text_offsets),
            "finish_reason": delta.finish_reason,
        }

    def _logprobs(self, entries: list[Entry], offsets: list[int]) -> dict[str, Any] | None:
        if not self.wants_logprobs:
            return None
        text = self._texts.text
        scored = [e if isinstance(e, TokenLogprob) else None for e in entries]
        return {
            "tokens": [text(e if isinstance(e, int) else e.token_id) for e in entries],
            "token_logprobs": [None if e is None else _logprob(e.logprob) for e in scored],
            "top_logprobs": [None if e is None else {text(t): _logprob(lp) for t, lp in e.top} for e in scored],
            "text_offset": offsets,
        }


class ChatFormat:
    """`/v1/chat/completions`: `chat.completion` objects, `message`/`delta`, chat-style logprobs."""

    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, texts: TokenTexts, wants_logprobs: bool) -> None:
        self._texts = texts
        self.wants_logprobs = wants_logprobs

    def new_state(self, index: int) -> ChoiceState:
        return ChoiceState()

    def choice(self, index: int, state: ChoiceState) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": state.text},
            "logprobs": self._logprobs(state.logprobs),
            "finish_reason": state.finish_reason,
        }

    def opening_chunk_choice(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def chunk_choice(self, index: int, delta: Delta) -> dict[str, Any]:
        return {
            "index": index,
            "delta": {"content": delta.text} if delta.text or delta.finish_reason is None else {},
            "logprobs": self._logprobs(delta.logprobs),
            "finish_reason": delta.finish_reason,
        }

    def _logprobs(self, entries: list[Entry]) -> dict[str, Any] | None:
        if not self.wants_logprobs:
            return None
        return {"content": [self._entry(e) for e in entries if isinstance(e, TokenLogprob)], "refusal": None}

    def _entry(self, entry: TokenLogprob) -> dict[str, Any]:
        return {
            **self._token(entry.token_id, entry.logprob),
            "top_logprobs": [self._token(t, lp) for t, lp in entry.top],
        }

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": self._texts.text(token_id),
            "logprob": _logprob(logprob),
            "bytes": list(self._texts.bytes(token_id)),
        }

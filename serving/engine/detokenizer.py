"""Incremental detokenization: text deltas that never split a UTF-8 character or leak a stop string."""

from __future__ import annotations

from tokenizers import Tokenizer

# Tokens of context decoded together with new ones, so that tokenizers which fold spaces into the next token
# (SentencePiece-style) still produce the right characters at the boundary.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        *,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        """`include_stop`: a matched stop string stays at the end of the text (vLLM's include_stop_str_in_output);
        `skip_special_tokens`: special tokens decode to nothing (vLLM's default) or to their text."""
        self._tok = tokenizer
        self._include_stop = include_stop
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded output text (before stop truncation)
        self._emitted = 0  # characters of `text` already handed out

    def add(self, token_id: int, *, check_stop: bool = True) -> str | None:
        """Append a token; returns the stop string that matched, if any (the text is then cut before it, or after it
        with `include_stop`). `check_stop=False`: no stop string can match in this token's text (min_tokens)."""
        self._ids.append(token_id)
        skip = self._skip_special
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = len(self.text)
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            # Only a match that reaches into the new text can be new; the earliest match wins.
            if not check_stop:
                return None
            hits = [(at, s) for s in self.stop if (at := self.text.find(s, max(0, start - len(s) + 1))) != -1]
            if hits:
                at, s = min(hits)
                self.text = self.text[: at + len(s) if self._include_stop else at]
                return s
        return None

    def take(self, final: bool) -> str:
        """Text not yet handed out; while running, the last characters that could start a stop string wait."""
        end = len(self.text) if final or not self.stop else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

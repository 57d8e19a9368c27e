"""Incremental detokenization: text deltas that never split a UTF-8 character or leak a stop string."""

from __future__ import annotations

from tokenizers import Tokenizer

# Tokens of context decoded together with new ones, so that tokenizers which fold spaces into the next token
# (SentencePiece-style) still produce the right characters at the boundary.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded output text (before stop truncation)
        self._emitted = 0  # characters of `text` already handed out

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string that matched, if any (the text is then cut before it)."""
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = len(self.text)
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            # Only a match that reaches into the new text can be new; the earliest match wins.
            hits = [(at, s) for s in self.stop if (at := self.text.find(s, max(0, start - len(s) + 1))) != -1]
            if hits:
                at, s = min(hits)
                self.text = self.text[:at]
                return s
        return None

    def take(self, final: bool) -> str:
        """Text not yet handed out; while running, the last characters that could start a stop string wait."""
        end = len(self.text) if final or not self.stop else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

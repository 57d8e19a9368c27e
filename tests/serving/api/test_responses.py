"""How logprobs name tokens and place them in the text, on the tiny model's byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from switchboard.serving.api.responses import ChoiceState, TokenTexts
from switchboard.serving.engine.request import FinishReason, RequestOutput, TokenLogprob

TEXT = "déjà vu: 日本語 ✓ ok"  # characters of 1, 2 and 3 UTF-8 bytes


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_token_bytes_rebuild_the_text(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert b"".join(texts.bytes(i) for i in ids) == TEXT.encode("utf-8")
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial, "the sample text should split some character across tokens"
    for i in partial:
        assert texts.text(i).startswith("bytes:\\x")
    names = [texts.text(i) for i in range(len(tokenizer))]
    assert len(set(names)) == len(names)  # no two tokens share a name, so top_logprobs keys never collide


def test_text_offsets_follow_characters(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    state = ChoiceState()
    for n, token_id in enumerate(ids, start=1):
        last = n == len(ids)
        state.update(
            RequestOutput(
                request_id="r",
                index=0,
                new_text="",
                new_token_ids=[token_id],
                logprobs=[TokenLogprob(token_id, -1.0, [])],
                finished=last,
                finish_reason=FinishReason.LENGTH if last else None,
                prompt_tokens=1,
                completion_tokens=n,
            ),
            texts,
        )
    # Each token's offset is where its first (possibly shared) character starts in the text.
    expected = []
    consumed = b""
    for token_id in ids:
        expected.append(len(consumed.decode("utf-8", errors="ignore")))
        consumed += texts.bytes(token_id)
    assert state.text_offsets == expected
    assert state.finish_reason == "length" and state.completion_tokens == len(ids)

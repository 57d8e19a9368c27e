"""The token count that refuses long texts before tokenizing them whole (`prompts._count_at_least`): never more
than the text's real count, exact when that fits the limit; and a text of megabytes is refused quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from switchboard.serving.api.errors import ApiError
from switchboard.serving.api.prompts import Budget, _count_at_least, completion_prompts
from switchboard.serving.engine.llm_engine import load_tokenizer

from ...real_model import HAVE_REAL_MODEL, REAL_MODEL

LIMIT = 256
TEXTS = {
    "words": "the quick brown fox jumps over the lazy dog " * 200,
    "runs of spaces": "a  b   c    d\n\n e\t f " * 300,
    "unicode": "héllo wörld 日本語のテキスト 🙂 " * 200,
    "no space": "x" * 5000,
    "one space late": "y" * 3000 + " z" * 10,
    "numbers": " ".join(str(i) for i in range(3000)),
    "short": "hello world",
}


@pytest.fixture(scope="module", params=["tiny", *([REAL_MODEL] if HAVE_REAL_MODEL else [])], ids=str)
def tokenizer(request: pytest.FixtureRequest, tiny_model_dir: Path) -> PreTrainedTokenizerFast:
    return load_tokenizer(tiny_model_dir if request.param == "tiny" else request.param)


@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("special", [True, False])
def test_the_count_is_a_lower_bound_exact_within_the_limit(
    tokenizer: PreTrainedTokenizerFast, name: str, special: bool
) -> None:
    text = TEXTS[name]
    exact = len(tokenizer.encode(text, add_special_tokens=special))
    counted = _count_at_least(tokenizer, text, LIMIT, add_special_tokens=special)
    assert counted <= exact
    if exact <= LIMIT or counted <= LIMIT:
        assert counted == exact
    else:
        assert counted > LIMIT


def test_a_text_of_megabytes_is_refused_without_tokenizing_it(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "hello world " * (4 * 1024 * 1024 // 12)
    start = time.perf_counter()
    with pytest.raises(ApiError) as info:
        completion_prompts(text, tokenizer, Budget(16, 2048, what="prompt"))
    assert time.perf_counter() - start < 1.0  # tokenizing it whole takes seconds
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert "at least" in info.value.message

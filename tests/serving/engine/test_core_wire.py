"""The engine core's channel and the API process's output processor, without processes: messages survive msgpack
unchanged, and the output processor turns token-id outputs into the text and finish the in-process engine gives
(stop strings cut the text, drop later tokens and stop that choice in the core)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from switchboard.serving.engine import wire
from switchboard.serving.engine.output_processor import RequestTexts
from switchboard.serving.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _output(tokens: list[int], *, index: int = 0, finished: bool = False, logprobs=None) -> RequestOutput:
    reason = FinishReason.LENGTH if finished else None
    return RequestOutput("r", index, "", tokens, logprobs, finished, reason, 3, 0)


def test_outputs_and_params_cross_the_wire_unchanged() -> None:
    params = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.9, top_k=3, seed=-5, stop=["x"], n=2, logprobs=1)
    assert wire.params_from_wire(wire.unpack(wire.pack([wire.params_to_wire(params)]))[0]) == params
    out = RequestOutput(
        "req-1",
        1,
        "",
        [5, 6],
        [TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.25)])] * 2,
        True,
        FinishReason.ERROR,
        4,
        2,
        "x",
    )
    back = wire.output_from_wire(wire.unpack(wire.pack([wire.output_to_wire(out)]))[0])
    assert back == out
    snapshot = wire.Snapshot(num_running=3, waiting_by_tenant={"a": 2}, running_adapters=["k"], host=[1, 2, 3, 4, 5])
    assert wire.Snapshot.from_wire(wire.unpack(wire.pack(snapshot.to_wire()))) == snapshot


def test_texts_join_to_the_decode_and_a_stop_string_stops_the_choice(tokenizer) -> None:
    ids = tokenizer("one two STOP three four", add_special_tokens=False)["input_ids"]
    stopped: list[int] = []
    texts = RequestTexts(tokenizer.backend_tokenizer, [0], SamplingParams(stop=["STOP"], n=2), stopped.append)
    outs = [texts.process(_output([t], index=1)) for t in ids]
    ended = [o for o in outs if o is not None and o.finished]
    assert len(ended) == 1 and ended[0].finish_reason is FinishReason.STOP
    assert "".join(o.new_text for o in outs if o is not None) == "one two "
    assert stopped == [1]  # the core is told to stop choice 1, once
    assert outs[-1] is None  # the core's later tokens for that choice are dropped
    kept = sum(len(o.new_token_ids) for o in outs if o is not None)
    assert ended[0].completion_tokens == kept < len(ids)
    # the other choice has its own detokenizer: its stop string is found in one batch of tokens
    last = texts.process(_output(ids, index=0, finished=True))
    assert last is not None and last.new_text == "one two "
    assert last.finished and last.finish_reason is FinishReason.STOP and last.completion_tokens < len(ids)


def test_a_stop_string_inside_a_batch_of_tokens_cuts_tokens_and_logprobs(tokenizer) -> None:
    ids = tokenizer("ab STOP cd", add_special_tokens=False)["input_ids"]
    lps = [TokenLogprob(t, -1.0, []) for t in ids]
    stopped: list[int] = []
    texts = RequestTexts(tokenizer.backend_tokenizer, [0], SamplingParams(stop=["STOP"]), stopped.append)
    out = texts.process(_output(ids, logprobs=lps))
    assert out is not None and out.finished and out.new_text == "ab "
    assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids) < len(ids)
    assert stopped == [0]


def test_without_stop_strings_the_core_decides_the_end(tokenizer) -> None:
    ids = tokenizer("plain text", add_special_tokens=False)["input_ids"]
    stopped: list[int] = []
    texts = RequestTexts(tokenizer.backend_tokenizer, [0], SamplingParams(), stopped.append)
    first = texts.process(_output(ids[:-1]))
    last = texts.process(_output(ids[-1:], finished=True))
    assert first is not None and last is not None and first.new_text + last.new_text == "plain text"
    assert last.finish_reason is FinishReason.LENGTH and last.completion_tokens == len(ids) and stopped == []

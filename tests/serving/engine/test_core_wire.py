"""The engine core's channel and the API process's output processor, without processes: messages survive msgpack
unchanged, and the output processor turns token-id outputs into the text and finish the in-process engine gives
(stop strings cut the text, drop later tokens and stop that choice in the core)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from switchboard.serving.engine import wire
from switchboard.serving.engine.guided import Grammar, GrammarCompiler, GuidedKind, GuidedSpec
from switchboard.serving.engine.llm_engine import AdapterStats
from switchboard.serving.engine.output_processor import RequestTexts
from switchboard.serving.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _output(tokens: list[int], *, index: int = 0, finished: bool = False, logprobs=None) -> RequestOutput:
    reason = FinishReason.LENGTH if finished else None
    return RequestOutput("r", index, "", tokens, logprobs, finished, reason, 3, 0)


def test_outputs_and_params_cross_the_wire_unchanged(tokenizer) -> None:
    grammars = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    spec = GuidedSpec(GuidedKind.CHOICE, '["yes", "no"]')
    params = SamplingParams(
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        seed=-5,
        stop=["x", "\ud800"],  # a lone surrogate: JSON allows it, and so does the engine in one process
        n=2,
        logprobs=1,
        repetition_penalty=1.5,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        min_p=0.1,
        min_tokens=2,
        logit_bias={5: -100.0, 7: 2.5},
        allowed_token_ids=[5, 7, 9],
        bad_words_token_ids=[[5, 7], [9]],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        prompt_logprobs=3,
        guided=grammars.compile(spec),
    )
    compiled: list[GuidedSpec] = []

    def compile_grammar(spec: GuidedSpec) -> Grammar:
        compiled.append(spec)
        return grammars.compile(spec)

    back = wire.params_from_wire(wire.unpack(wire.pack([wire.params_to_wire(params)]))[0], compile_grammar)
    assert back == params  # the grammar from the compiler's cache: the same object
    assert compiled == [spec]
    plain = SamplingParams(max_tokens=3)
    assert wire.params_from_wire(wire.unpack(wire.pack([wire.params_to_wire(plain)]))[0], compile_grammar) == plain
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
        prompt_logprobs=[None, TokenLogprob(3, -2.0, [(3, -2.0), (4, -2.5)])],
    )
    assert wire.output_from_wire(wire.unpack(wire.pack([wire.output_to_wire(out)]))[0]) == out
    adapters = AdapterStats(4, 2, 7, 9, 1, running=["k"], waiting=[])
    snapshot = wire.Snapshot(num_running=3, waiting_by_tenant={"a": 2}, adapters=adapters, host=[1, 2, 3, 4, 5])
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


def test_min_tokens_and_include_stop_str_as_in_one_process(tokenizer) -> None:
    """No stop string ends a choice before min_tokens tokens; include_stop_str_in_output keeps the string, and the
    text of the token the core stopped on (a stop token)."""
    ids = tokenizer("ab STOP cd STOP ef", add_special_tokens=False)["input_ids"]
    first_stop = next(i for i in range(len(ids)) if "STOP" in tokenizer.decode(ids[: i + 1]))
    stopped: list[int] = []
    params = SamplingParams(stop=["STOP"], min_tokens=first_stop + 2, max_tokens=64, include_stop_str_in_output=True)
    out = RequestTexts(tokenizer.backend_tokenizer, [0], params, stopped.append).process(_output(ids))
    assert out is not None and out.finish_reason is FinishReason.STOP
    assert out.new_text == "ab STOP cd STOP" and stopped == [0]

    stop_token = ids[-1]
    stopped_on = RequestOutput("r", 0, "", ids, None, True, FinishReason.STOP, 3, 0)
    for include in (False, True):
        params = SamplingParams(stop_token_ids=[stop_token], include_stop_str_in_output=include, max_tokens=64)
        out = RequestTexts(tokenizer.backend_tokenizer, [0], params, stopped.append).process(stopped_on)
        assert out is not None
        assert out.new_text == tokenizer.decode(ids if include else ids[:-1])

"""Structured output in the engine: the batched mask equals a per-token reference, guided greedy decoding equals
greedy decoding by plain forward passes under the grammar's mask (with and without adapters, beside plain requests in
one batch), every sampled output matches its grammar and ends with "stop", and plain rows are untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr
from peft import PeftModel
from transformers import AutoModelForCausalLM

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.guided import (
    GrammarCompiler,
    GuidedError,
    GuidedKind,
    GuidedSpec,
    TokenMasks,
    apply_token_masks,
)
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import FinishReason, SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "admin"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,5}"
CHOICES = ["yes", "no", 'say "maybe"', "back\\slash", "naïve ☃ 😀"]
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | [0-9]+'
SPECS = {
    "schema": GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(PERSON)),
    "object": GuidedSpec(GuidedKind.JSON_OBJECT),
    "regex": GuidedSpec(GuidedKind.REGEX, REGEX),
    "choice": GuidedSpec(GuidedKind.CHOICE, json.dumps(CHOICES)),
    "grammar": GuidedSpec(GuidedKind.GRAMMAR, GRAMMAR),
}
MAX_TOKENS = 128


def matches(name: str, text: str) -> bool:
    """Whether `text` is what the spec `name` asks for (checked without xgrammar)."""
    if name == "schema":
        jsonschema.validate(json.loads(text), PERSON)
        return True
    if name == "object":
        return isinstance(json.loads(text), dict)
    if name == "regex":
        return re.fullmatch(REGEX, text) is not None
    if name == "choice":
        return text in CHOICES
    return re.fullmatch(r"\((?:[a-c]|[0-9]+)(?:,(?:[a-c]|[0-9]+))*\)", text) is not None


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, peft_adapters: dict[str, Path]) -> LLMEngine:
    adapters = {name: peft_adapters[name] for name in ("lora", "ia3", "prefix")}
    config = ServeConfig(model=tiny_model_dir, dtype="float32", device="auto", num_kv_blocks=512, adapters=adapters)
    return LLMEngine(config)


def _prompts(engine: LLMEngine) -> list[list[int]]:
    texts = ["def main():", "Return a person as JSON:", "import os\n", "class A:", "x = [1, 2", "# a comment"]
    return [engine.tokenizer.encode(t) for t in texts]


def _run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams, str | None]]):
    """Admit every request at once (one batch), step to the end; per request: each choice's (tokens, reason)."""
    ids = [f"guided-test-{i}" for i in range(len(requests))]
    for rid, (prompt, params, adapter) in zip(ids, requests, strict=True):
        engine.add_request(rid, prompt, params, adapter)
    tokens = {rid: [[] for _ in range(params.n)] for rid, (_, params, _) in zip(ids, requests, strict=True)}
    reasons = {rid: [None] * params.n for rid, (_, params, _) in zip(ids, requests, strict=True)}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id][out.index].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id][out.index] = out.finish_reason
    return [list(zip(tokens[rid], reasons[rid], strict=True)) for rid in ids]


def _text(engine: LLMEngine, tokens: list[int]) -> str:
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


# ---- the mask --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 31, 32, 100, 512])
def test_apply_token_masks_matches_a_per_token_reference(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, words), generator=g, dtype=torch.int64).to(torch.int32)
    rows = [0, 2, 3]
    before = logits.clone()
    out = apply_token_masks(logits, TokenMasks(bitmask, rows))
    expected = before.clone()
    for i in rows:
        for t in range(vocab):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                expected[i, t] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.equal(logits, before)  # logprobs come from the model's logits
    assert apply_token_masks(logits, None) is logits


# ---- compiling -------------------------------------------------------------------------------------------------
def test_compiler_caches_by_spec_and_refuses_invalid_specs(engine: LLMEngine) -> None:
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, sorted(engine.eos_token_ids))
    first = compiler.compile(SPECS["schema"])
    assert compiler.compile(GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(PERSON))) is first
    assert compiler.num_compiled == 1
    bad = [
        GuidedSpec(GuidedKind.JSON_SCHEMA, '{"type": "nonsense"}'),
        GuidedSpec(GuidedKind.JSON_SCHEMA, '{"type": "string", "minLength": 5, "maxLength": 2}'),
        GuidedSpec(GuidedKind.REGEX, "(unclosed"),
        GuidedSpec(GuidedKind.GRAMMAR, 'start ::= "a"'),  # no root rule
        GuidedSpec(GuidedKind.REGEX, "[^\\x00-\\U0010FFFF]"),  # matches nothing: no first token
    ]
    for spec in bad:
        with pytest.raises(GuidedError) as err:
            compiler.compile(spec)
        assert "/project/" not in str(err.value)  # xgrammar's source location is stripped
    assert compiler.num_compiled == 1


def test_length_limited_strings_stay_valid_json(engine: LLMEngine) -> None:
    # xgrammar alone lets a raw control character into a string with maxLength; ours keeps JSON's rule.
    compiled = engine.grammars.compile(SPECS["schema"]).compiled
    control = engine.tokenizer.convert_tokens_to_ids("ē")  # byte-level for byte 0x13
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string('{"name": "ab')
    assert not matcher.accept_token(control)
    assert matcher.accept_string('c", "age": 7, "tags": ["a"], "admin": false}')
    assert matcher.is_completed()


def test_choice_grammar_matches_exactly_the_choices(engine: LLMEngine) -> None:
    compiled = engine.grammars.compile(SPECS["choice"]).compiled
    for text in [*CHOICES, "ye", "yess", 'say "maybe', "back\\\\slash", "naive ☃ 😀"]:
        matcher = xgr.GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) == (text in CHOICES), text


# ---- decoding --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _masked_greedy(model, compiled: xgr.CompiledGrammar, prompt: list[int], stop: set[int]) -> list[int]:
    """Reference: greedy decoding by plain forward passes, each step's argmax over the tokens the grammar allows
    (read bit by bit from a fresh matcher), until the grammar accepts a stop token or MAX_TOKENS."""
    matcher = xgr.GrammarMatcher(compiled)
    ids, out = list(prompt), []
    vocab = model.config.vocab_size
    while len(out) < MAX_TOKENS:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        matcher.fill_next_token_bitmask(bitmask, 0)
        words = bitmask[0].tolist()
        allowed = torch.tensor([bool((words[t // 32] >> (t % 32)) & 1) for t in range(vocab)])
        token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        assert matcher.accept_token(token)
        ids.append(token)
        out.append(token)
        if matcher.is_terminated():
            assert token in stop
            break
    return out


def test_guided_greedy_equals_masked_forward_passes_in_one_mixed_batch(
    engine: LLMEngine, tiny_model_dir: Path, peft_adapters: dict[str, Path]
) -> None:
    prompts = _prompts(engine)
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    requests: list[tuple[list[int], SamplingParams, str | None]] = []
    cases = [("schema", None), ("regex", None), ("choice", None), ("grammar", None), ("schema", "lora")]
    cases += [("choice", "prefix")]
    for i, (name, adapter) in enumerate(cases):
        grammar = engine.grammars.compile(SPECS[name])
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, guided=grammar)
        requests.append((prompts[i % len(prompts)], params, adapter))
    requests += [(prompts[0], plain, None), (prompts[1], plain, "ia3"), (prompts[2], plain, "prefix")]
    results = _run(engine, requests)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    models = {None: base}
    for (name, adapter), (prompt, params, _), result in zip(cases, requests, results, strict=False):
        if adapter not in models:
            hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            models[adapter] = PeftModel.from_pretrained(hf, peft_adapters[adapter]).eval()
        assert params.guided is not None
        expected = _masked_greedy(models[adapter], params.guided.compiled, prompt, engine.eos_token_ids)
        [(tokens, reason)] = result
        assert tokens == expected, (name, adapter)
        assert reason is FinishReason.STOP
        assert matches(name, _text(engine, tokens)), (name, _text(engine, tokens))
    # The plain rows of the batch are what they are alone.
    for (prompt, params, adapter), result in zip(requests[len(cases) :], results[len(cases) :], strict=True):
        assert [tokens for tokens, _ in result] == [engine.generate([prompt], params, [adapter])[0]]


def test_every_sampled_choice_matches_its_grammar_and_stops(engine: LLMEngine) -> None:
    prompts = _prompts(engine)
    requests = []
    names = ["schema", "regex", "choice", "grammar"]
    for i, name in enumerate(names):
        grammar = engine.grammars.compile(SPECS[name])
        for adapter in (None, ("lora", "prefix")[i % 2]):
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, n=3, seed=i, guided=grammar)
            requests.append((prompts[i], params, adapter))
    requests.append((prompts[4], SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=2), "ia3"))
    results = _run(engine, requests)
    for (_, params, adapter), result in zip(requests, results, strict=True):
        if params.guided is None:
            assert all(len(tokens) == 16 or reason is FinishReason.STOP for tokens, reason in result)
            continue
        name = next(n for n in names if SPECS[n] == params.guided.spec)
        for tokens, reason in result:
            assert reason is FinishReason.STOP, (name, adapter, _text(engine, tokens))
            assert tokens[-1] in engine.eos_token_ids
            assert matches(name, _text(engine, tokens)), (name, adapter, _text(engine, tokens))


def test_the_grammar_ends_the_sequence_under_ignore_eos(engine: LLMEngine) -> None:
    grammar = engine.grammars.compile(SPECS["choice"])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, guided=grammar)
    [[(tokens, reason)]] = _run(engine, [(_prompts(engine)[0], params, None)])
    assert reason is FinishReason.STOP
    assert _text(engine, tokens) in CHOICES


def test_a_grammar_with_no_way_on_ends_where_it_stopped(engine: LLMEngine) -> None:
    # "(" can be written, after it nothing can: the sequence ends there instead of sampling a forbidden token.
    grammar = engine.grammars.compile(GuidedSpec(GuidedKind.GRAMMAR, 'root ::= "(" [^\\x00-\\U0010FFFF]'))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, guided=grammar)
    [[(tokens, reason)]] = _run(engine, [(_prompts(engine)[0], params, None)])
    assert reason is FinishReason.STOP
    assert _text(engine, tokens) == "("


def test_preemption_keeps_each_matcher_in_step(tiny_model_dir: Path) -> None:
    # 24 blocks of 4 slots cannot hold eight sequences' prompts and outputs at once: some are preempted and recomputed.
    config = ServeConfig(model=tiny_model_dir, dtype="float32", device="auto", num_kv_blocks=24, block_size=4)
    small = LLMEngine(config)
    prompts = _prompts(small)
    grammar = small.grammars.compile(SPECS["schema"])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, n=2, guided=grammar)
    requests = [(prompts[i % len(prompts)], params, None) for i in range(4)]
    results = _run(small, requests)
    assert small.stats().num_preemptions > 0
    big = LLMEngine(ServeConfig(model=tiny_model_dir, dtype="float32", device="auto", num_kv_blocks=512))
    params_big = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=1.0, seed=3, n=2, guided=big.grammars.compile(SPECS["schema"])
    )
    assert results == _run(big, [(prompt, params_big, None) for prompt, _, _ in requests])
    for result in results:
        for tokens, reason in result:
            assert reason is FinishReason.STOP
            assert matches("schema", _text(small, tokens))


def test_a_grammar_that_meets_no_allowed_token_still_ends_on_its_own_tokens() -> None:
    """allowed_token_ids without the grammar's only token (here EOS, as after guided_choice [""]): the grammar wins,
    from the raw logits, instead of an all -inf row drawing token 0 (which Schemathesis found as a 500)."""
    from switchboard.serving.engine.guided import TokenMasks
    from switchboard.serving.engine.logits_processors import TokenHistory
    from switchboard.serving.engine.request import SamplingParams
    from switchboard.serving.engine.sampler import sample

    vocab, eos = 64, 2
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    bitmask = torch.full((2, vocab // 32), -1, dtype=torch.int32)
    bitmask[0] = 0
    bitmask[0, eos // 32] = 1 << (eos % 32)  # row 0's grammar allows EOS only
    greedy = [SamplingParams(temperature=0.0, allowed_token_ids=[5, 6]), SamplingParams(temperature=0.0)]
    history = [TokenHistory([1, 7], []), TokenHistory([1, 7], [])]
    tokens, _ = sample(logits, greedy, [None, None], history, [eos], TokenMasks(bitmask, [0]))
    assert tokens == [eos, int(logits[1].argmax())]
    sampled = [SamplingParams(temperature=1.0, allowed_token_ids=[5, 6]), greedy[1]]
    tokens, _ = sample(
        logits, sampled, [torch.Generator().manual_seed(1), None], history, [eos], TokenMasks(bitmask, [0])
    )
    assert tokens[0] == eos

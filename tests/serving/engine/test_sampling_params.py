"""vLLM's sampling parameters through the whole engine (issue 19, item 1): greedy generation with every processor on
equals a reference loop of plain forward passes with the reference processors; prompt logprobs equal the forward
pass's; min_tokens and include_stop_str_in_output act on what ends a sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import FinishReason, RequestOutput, SamplingParams

from .test_logits_processors import reference_logits


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine(ServeConfig(model=tiny_model_dir, dtype="float32", device="cpu", num_kv_blocks=256))


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(19)
    lengths = torch.randint(3, 30, (n,), generator=g).tolist()
    return [[1, *torch.randint(10, 300, (k,), generator=g).tolist()] for k in lengths]


@torch.inference_mode()
def reference_greedy(hf, prompt: list[int], p: SamplingParams, eos: set[int]) -> list[int]:
    """Greedy decoding by forward passes of the whole sequence, the reference processors applied to each step."""
    out: list[int] = []
    for _ in range(p.max_tokens):
        logits = hf(input_ids=torch.tensor([prompt + out])).logits[0, -1].tolist()
        row = reference_logits(logits, p, prompt, out)
        token = max(range(len(row)), key=row.__getitem__)
        out.append(token)
        if len(out) >= p.min_tokens and (token in p.stop_token_ids or (token in eos and not p.ignore_eos)):
            break
    return out


PENALTIES = [
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.8),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.7),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, frequency_penalty=-0.5, repetition_penalty=0.8),
    SamplingParams(
        max_tokens=24,
        temperature=0.0,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.4,
        logit_bias={40: 3.0, 41: -100.0},
        bad_words_token_ids=[[50], [60, 61]],
        min_tokens=6,
        stop_token_ids=[70, 71],
    ),
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, allowed_token_ids=[11, 12, 13, 14, 15]),
]


def test_every_processor_in_one_batch_equals_the_reference(engine: LLMEngine, hf) -> None:
    prompts = _prompts(len(PENALTIES) + 2)
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    params = [*PENALTIES, plain, plain]
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        engine.add_request(rid, prompt, p)
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        assert got[rid] == reference_greedy(hf, prompt, p, engine.eos_token_ids), (rid, p)
    # Each setting changed something: none of the penalized outputs is the plain greedy one.
    plain_out = engine.generate(prompts[: len(PENALTIES)], plain)
    assert all(got[ids[i]][: len(plain_out[i])] != plain_out[i] for i in range(len(PENALTIES)))


def test_allowed_tokens_and_bias_force_the_output(engine: LLMEngine) -> None:
    (out,) = engine.generate([[1, 5, 6]], SamplingParams(max_tokens=5, temperature=0.0, logit_bias={33: 100.0}))
    assert out == [33] * 5
    sampled = SamplingParams(max_tokens=30, temperature=1.5, seed=3, allowed_token_ids=[7, 8], ignore_eos=True)
    assert set(engine.generate([[1, 5, 6]], sampled)[0]) <= {7, 8}


def _run(engine: LLMEngine, prompt: list[int], p: SamplingParams) -> list[RequestOutput]:
    engine.add_request("one", prompt, p)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def test_min_tokens_holds_off_eos_and_stop_tokens(engine: LLMEngine) -> None:
    prompt = [1, 9, 9]
    first = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0][0]
    # The greedy first token stops a plain request at once; with min_tokens it cannot end the output before 5.
    stopped = _run(engine, prompt, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[first]))
    assert stopped[-1].completion_tokens == 1 and stopped[-1].finish_reason is FinishReason.STOP
    held = _run(engine, prompt, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[first], min_tokens=5))
    assert held[-1].completion_tokens >= 5


def test_include_stop_str_in_output(engine: LLMEngine) -> None:
    prompt = [1, 20, 21, 22]
    text = engine.tokenizer.decode(engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0])
    stop = text[3:5]
    assert len(stop) == 2
    cut = _run(engine, prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))
    including = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], include_stop_str_in_output=True)
    kept = _run(engine, prompt, including)
    cut_text, kept_text = ("".join(o.new_text for o in outs) for outs in (cut, kept))
    assert cut_text == text[: text.index(stop)] and kept_text == text[: text.index(stop) + 2]
    assert cut[-1].finish_reason is kept[-1].finish_reason is FinishReason.STOP


@pytest.mark.parametrize("max_batch_tokens", [None, 7])
def test_prompt_logprobs_equal_the_forward_pass(tiny_model_dir: Path, hf, max_batch_tokens: int | None) -> None:
    """Prompt logprobs also across prefill chunks (7 tokens a step) and beside a plain request."""
    overrides = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
    engine = LLMEngine(ServeConfig(model=tiny_model_dir, dtype="float32", device="cpu", num_kv_blocks=64, **overrides))
    prompt = _prompts(1)[0] + [5, 6, 7, 8, 9, 10, 11, 12]
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
    engine.add_request("echo", prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3, n=2))
    firsts: dict[tuple[str, int], RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            firsts.setdefault((out.request_id, out.index), out)
    assert firsts[("plain", 0)].prompt_logprobs is None
    with torch.inference_mode():
        want = hf(input_ids=torch.tensor([prompt])).logits[0].log_softmax(-1)
    for index in range(2):
        got = firsts[("echo", index)].prompt_logprobs
        assert got is not None and len(got) == len(prompt) and got[0] is None
        for pos, entry in enumerate(got[1:]):
            assert entry is not None and entry.token_id == prompt[pos + 1]
            assert entry.logprob == pytest.approx(float(want[pos, prompt[pos + 1]]), abs=1e-4)
            top = torch.topk(want[pos], 3)
            assert [t for t, _ in entry.top] == top.indices.tolist()


def test_prompt_logprobs_survive_preemption(tiny_model_dir: Path, hf) -> None:
    # 12 blocks of 4 slots: four 20-token prompts growing by 16 tokens cannot all stay; some are recomputed.
    engine = LLMEngine(ServeConfig(model=tiny_model_dir, dtype="float32", device="cpu", num_kv_blocks=24, block_size=4))
    prompts = [[1, *range(30 + 5 * i, 49 + 5 * i)] for i in range(4)]
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, p)
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got  # handed out once
                got[out.request_id] = out.prompt_logprobs
    assert engine.stats().num_preemptions > 0
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            want = hf(input_ids=torch.tensor([prompt])).logits[0].log_softmax(-1)
        values = [e.logprob for e in got[f"r{i}"][1:]]
        expected = [float(want[pos, prompt[pos + 1]]) for pos in range(len(prompt) - 1)]
        assert values == pytest.approx(expected, abs=1e-4)

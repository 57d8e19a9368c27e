"""Greedy generation equals greedy decoding by transformers' forward passes (training/greedy.py): alone, among 16
concurrent requests, and under preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import FinishReason, SamplingParams
from switchboard.training.greedy import greedy_tokens

NEW_TOKENS = 64
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 5, 8, 13, 17, 21, 26, 30, 34, 39, 44, 50, 57, 63, 70, 9]
    return [[1, *torch.randint(10, 500, (n - 1,), generator=g).tolist()] for n in lengths]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return [greedy_tokens(hf, p, NEW_TOKENS) for p in prompts]


def _engine(model_dir: Path, **kw) -> LLMEngine:
    return LLMEngine(ServeConfig(model=model_dir, dtype="float32", **kw))


def test_alone_matches_transformers(tiny_model_dir: Path, prompts, reference) -> None:
    engine = _engine(tiny_model_dir, num_kv_blocks=64)
    for p, ref in zip(prompts, reference, strict=False):
        assert engine.generate([p], GREEDY)[0] == ref


def test_sixteen_concurrent_match_transformers(tiny_model_dir: Path, prompts, reference) -> None:
    # A small token budget forces chunked prefill mixed with decodes of other requests.
    engine = _engine(tiny_model_dir, num_kv_blocks=256, max_batch_tokens=48)
    assert engine.generate(prompts, GREEDY) == reference
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_preemption_by_recompute_keeps_greedy_output(tiny_model_dir: Path, prompts, reference) -> None:
    # 40 blocks of 4 slots hold 160 tokens: the longest request alone needs 134, 16 together far more.
    engine = _engine(tiny_model_dir, num_kv_blocks=40, block_size=4)
    assert engine.generate(prompts, GREEDY) == reference
    assert engine.stats().num_preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_request_longer_than_the_pool_ends_with_length(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, num_kv_blocks=4, block_size=4)
    engine.add_request("r", [1] * 10, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    # 16 slots hold the keys of 10 prompt + 6 generated tokens; the 7th is sampled from the 16th and never stored.
    assert outs[-1].completion_tokens == 7
    assert engine.blocks.num_free == 4


@pytest.mark.parametrize(("setting", "expected"), [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_kv_cache_dtype(tiny_model_dir: Path, prompts, setting: str, expected: torch.dtype) -> None:
    # auto: the model's dtype (its keys and values are computed in it).
    config = ServeConfig(model=tiny_model_dir, dtype="bfloat16", device="cpu", num_kv_blocks=64, kv_cache_dtype=setting)
    engine = LLMEngine(config)
    assert engine.kv_cache.data.dtype == expected
    out = engine.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(o) for o in out] == [8] * 4


Logprobs = list[tuple[int, float, list[tuple[int, float]]]]  # per token: id, logprob, the top 3


def _greedy_with_logprobs(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, Logprobs]:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    got: dict[str, Logprobs] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.logprobs is not None
            got[out.request_id] += [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs]
    return got


def test_a_bf16_cache_gives_a_float32_caches_results(tiny_model_dir: Path, prompts) -> None:
    """A bf16 model's keys and values are bf16 values: held in a float32 cache they are the same numbers, and
    attention (prefill chunks and decodes) computes in float32 from either, so every logprob is identical. (The tiny
    model's head size, 16, takes the same decode kernel for both caches; at 64 and 128 an AVX-512 BF16 CPU runs a bf16
    cache's decode on its own path, which sums in another order.)"""
    results = []
    for kv in ("bfloat16", "float32"):
        config = ServeConfig(
            model=tiny_model_dir,
            dtype="bfloat16",
            device="cpu",
            num_kv_blocks=64,
            max_batch_tokens=24,
            kv_cache_dtype=kv,
        )
        results.append(_greedy_with_logprobs(LLMEngine(config), prompts[:6]))
    assert results[0] == results[1]


def test_a_prompt_longer_than_the_step_budget_alone(tiny_model_dir: Path, prompts, reference) -> None:
    # Its first steps are prefill chunks from which nothing samples: an empty set of rows to take logits from.
    engine = _engine(tiny_model_dir, num_kv_blocks=64, max_batch_tokens=16)
    assert engine.generate([prompts[-3]], GREEDY) == [reference[-3]]

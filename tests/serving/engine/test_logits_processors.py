"""vLLM's sampling parameters (issue 19, item 1) against a reference written as a plain loop over rows and tokens: the
batched tensor code must give the same logits, row by row, whatever else shares the batch."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from switchboard.serving.engine.logits_processors import TokenHistory, banned_tokens, process_logits
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.engine.sampler import min_p_filter, sample

V = 40
EOS = (2,)


def reference_logits(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """vLLM's definitions, one token at a time (the spec: vllm/v1/sample/sampler.py's order, apply_penalties)."""
    row = list(logits)
    if p.allowed_token_ids:
        row = [x if t in p.allowed_token_ids else -math.inf for t, x in enumerate(row)]
    for word in p.bad_words_token_ids:
        head = word[:-1]
        if len(head) <= len(output) and output[len(output) - len(head) :] == head:
            row[word[-1]] = -math.inf
    if len(output) < p.min_tokens:
        for t in [*p.stop_token_ids, *([] if p.ignore_eos else EOS)]:
            row[t] = -math.inf
    for t, bias in p.logit_bias.items():
        row[t] += bias
    seen, counts = set(prompt) | set(output), Counter(output)
    for t in range(len(row)):
        if t in seen:
            r = p.repetition_penalty
            row[t] = row[t] / r if row[t] > 0 else row[t] * r
        row[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    return row


def _random_params(rng: random.Random) -> SamplingParams:
    """A request using a random subset of the processors (some use none)."""
    fields: dict[str, object] = {"temperature": 0.0, "max_tokens": 8}
    if rng.random() < 0.6:
        fields["repetition_penalty"] = rng.choice([0.5, 1.0, 1.3, 5.0])
    if rng.random() < 0.6:
        fields["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.6:
        fields["frequency_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.3:
        fields["min_tokens"] = rng.randint(1, 8)
        fields["stop_token_ids"] = rng.sample(range(V), 2)
        fields["ignore_eos"] = rng.random() < 0.5
    if rng.random() < 0.4:
        fields["logit_bias"] = {t: rng.uniform(-100, 100) for t in rng.sample(range(V), 3)}
    if rng.random() < 0.3:
        fields["allowed_token_ids"] = rng.sample(range(V), 7)
    if rng.random() < 0.4:
        fields["bad_words_token_ids"] = [[rng.randrange(V)], [rng.randrange(V), rng.randrange(V)]]
    return SamplingParams(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(20))
def test_batched_processors_equal_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 4
    params = [_random_params(rng) for _ in range(n)]
    history = []
    for _ in range(n):
        output = [rng.randrange(V) for _ in range(rng.randint(0, 12))]
        # Make some bad words' prefixes match the output's end.
        history.append(TokenHistory([rng.randrange(V) for _ in range(rng.randint(1, 10))], output))
    got = process_logits(logits, params, history, EOS)
    for i, p in enumerate(params):
        want = torch.tensor(reference_logits(logits[i].tolist(), p, list(history[i].prompt), list(history[i].output)))
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-5, msg=f"row {i}: {p}")


def test_rows_that_use_nothing_are_untouched_and_nothing_is_copied() -> None:
    logits = torch.randn(3, V)
    plain = [SamplingParams(temperature=0.0)] * 3
    assert process_logits(logits, plain, [TokenHistory([1], [2])] * 3, EOS) is logits
    mixed = [plain[0], SamplingParams(repetition_penalty=2.0), plain[0]]
    out = process_logits(logits, mixed, [TokenHistory([1], [2])] * 3, EOS)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2]) and not torch.equal(out[1], logits[1])


def test_bad_word_prefixes_match_the_output_only() -> None:
    assert banned_tokens([[5], [1, 2, 3]], [9, 1, 2]) == [5, 3]
    assert banned_tokens([[1, 2, 3]], [1, 2, 9]) == []
    assert banned_tokens([[1, 2, 3]], [2]) == []  # longer than the output: nothing to match yet


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_min_p_keeps_what_the_reference_keeps(min_p: float, temperature: float) -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    probs = (logits / temperature).softmax(-1)
    want = probs >= min_p * probs.max()  # vLLM: probability at least min_p times the top one's
    row = (logits - logits.max()) / temperature
    assert torch.equal(torch.isfinite(min_p_filter(row, min_p)), want)


def test_sampled_tokens_lie_in_the_min_p_set() -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(4)) * 2
    probs = logits[0].softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    p = SamplingParams(temperature=1.0, min_p=0.2)
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, [p], [g])[0][0] for _ in range(300)}
    assert drawn <= allowed and len(drawn) > 1


def test_logprobs_are_the_raw_models_and_the_token_the_processed_argmax() -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5))
    p = SamplingParams(temperature=0.0, logit_bias={7: 100.0}, logprobs=2)
    (token,), (lp,) = sample(logits, [p], [None], [TokenHistory([1], [])], EOS)
    assert token == 7
    assert lp is not None and lp.logprob == pytest.approx(float(logits[0].log_softmax(-1)[7]))


def test_processors_without_history_are_refused() -> None:
    with pytest.raises(ValueError, match="history"):
        sample(torch.randn(1, V), [SamplingParams(repetition_penalty=1.2)], [None])


@pytest.mark.parametrize(
    "fields",
    [
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"min_p": 1.5},
        {"min_tokens": 20, "max_tokens": 10},
        {"bad_words_token_ids": [[]]},
    ],
)
def test_out_of_range_values_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**fields)  # type: ignore[arg-type]


def test_overflow_and_fully_masked_rows_still_sample() -> None:
    """Found by Schemathesis: a repetition penalty near 0 made +inf logits, and sampling met NaN."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6))
    params = [
        SamplingParams(temperature=1.0, repetition_penalty=1e-300),
        SamplingParams(temperature=1.0, allowed_token_ids=[4], bad_words_token_ids=[[4]]),
        SamplingParams(temperature=0.0, repetition_penalty=1e-300),
    ]
    history = [TokenHistory(list(range(V)), [])] * 3
    tokens, _ = sample(logits, params, [torch.Generator().manual_seed(0)] * 3, history, EOS)
    assert all(t is not None and 0 <= t < V for t in tokens)

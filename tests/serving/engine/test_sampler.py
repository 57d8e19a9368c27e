"""The sampler is numerically safe for every value the request schema admits (issue 14): the most likely token always
survives top-k and top-p, no temperature makes a NaN, and a row of non-finite logits is refused alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.engine.sampler import sample

V = 64


def _rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(V, generator=g) * 3
    spread = torch.where(torch.arange(V) % 2 == 0, 3e38, -3e38)  # max - min overflows float32
    flat = torch.zeros(V)  # every token equally likely
    peaked = torch.full((V,), -1e38)
    peaked[17] = 1e38
    return torch.stack([normal, spread, flat, peaked])


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"),
    itertools.product([0.0, 1e-300, 1e-6, 1e-5, 0.01, 1.0, 2.0, 1e30], [1e-300, 1e-8, 0.5, 1.0], [0, 1, 5, V, 10**12]),
)
def test_every_admitted_setting_samples_a_valid_token(temperature: float, top_p: float, top_k: int) -> None:
    logits = _rows()
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, logprobs=20)] * len(logits)
    generators = [torch.Generator().manual_seed(i) for i in range(len(logits))]
    tokens, logprobs = sample(logits, params, generators)
    assert all(t is not None and 0 <= t < V for t in tokens)
    assert tokens[3] == 17  # the only token with any mass
    if top_p < 1e-7 or top_k == 1 or temperature < 1e-5:
        assert all(logits[i, tokens[i]] == logits[i].max() for i in range(2))  # only a most likely token survives
    assert all(lp is not None and len(lp.top) == 20 for lp in logprobs)


def test_more_logprobs_than_the_vocabulary() -> None:
    (token,), (lp,) = sample(torch.randn(1, 8), [SamplingParams(temperature=0.0, logprobs=20)], [None])
    assert lp is not None and len(lp.top) == 8 and lp.top[0][0] == token


def test_a_non_finite_row_is_refused_alone() -> None:
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9, seed=1, logprobs=3)] * 2
    params.append(SamplingParams(temperature=1.0, top_p=1e-300, logprobs=1))

    def draw(rows: torch.Tensor, ps: list[SamplingParams]) -> tuple[list[int | None], list]:
        return sample(rows, ps, [torch.Generator().manual_seed(7) for _ in ps])

    clean, clean_lp = draw(logits, params)
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = logits.clone()
        poisoned[2, 3] = bad
        poisoned[4, :] = bad
        tokens, lps = draw(poisoned, params)
        assert tokens[2] is None and tokens[4] is None and lps[2] is None and lps[4] is None
        keep = [0, 1, 3]
        assert [tokens[i] for i in keep] == [clean[i] for i in keep]
        assert [lps[i] for i in keep] == [clean_lp[i] for i in keep]


def test_a_finite_row_whose_sum_overflows_still_samples() -> None:
    """Non-finite rows are found from row sums; a finite row of huge logits overflows its sum and must not be taken
    for a non-finite one."""
    logits = torch.full((2, V), 3e37)
    logits[0, 5] = 3.1e37
    logits[1, 1] = float("nan")
    tokens, _ = sample(logits, [SamplingParams(temperature=0.0)] * 2, [None, None])
    assert tokens == [5, None]


def test_greedy_takes_the_first_of_tied_maxima() -> None:
    logits = torch.zeros(3, V)
    logits[0, [7, 2]] = 1.0
    logits[1, V - 1] = 2.0
    tokens, _ = sample(logits, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert tokens == [2, V - 1, 0]


@pytest.mark.parametrize(
    "fields",
    [{"temperature": float("inf")}, {"temperature": float("nan")}, {"seed": 2**64}, {"seed": 2**64 - 1, "n": 2}],
)
def test_settings_torch_cannot_honour_are_refused_up_front(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**fields)  # type: ignore[arg-type]

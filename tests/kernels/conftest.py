"""Shared cases for the kernel tests: one tolerance table keyed by dtype, and adapter-popularity patterns."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

# Triton decides between compiling and interpreting when a kernel is decorated, i.e. when switchboard's Triton
# modules are first imported (only the tests and the TRITON backend's loader import them). Without a GPU, the
# Triton tests run the kernels on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Compared with a float32 reference; inputs are scaled so that outputs are O(1).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.bfloat16: {"atol": 4e-2, "rtol": 2e-2},
}


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, dtype=dtype)
        torch.mm(a, a)
        torch.zeros(2, 2, dtype=dtype).index_add_(0, torch.tensor([0, 1]), a)
    except RuntimeError:
        return False
    return True


DTYPES = [
    torch.float32,
    torch.bfloat16,
    pytest.param(
        torch.float16,
        marks=pytest.mark.skipif(not _cpu_supports(torch.float16), reason="no float16 matmul on this CPU build"),
    ),
]

# Patterns of adapter popularity over one batch, after Punica's tests.
PATTERNS = [
    "distinct",  # every token its own adapter (a decode batch over many adapters)
    "uniform",  # each token's adapter drawn uniformly: short runs, some longer than one
    "zipf",  # a few popular adapters
    "identical",  # every token the same adapter
    "prefill",  # long runs (prefill chunks) with decode tokens and runs without an adapter between them
    "decode_none",  # decode batch, every other token without an adapter
    "single",  # one token
    "empty",  # no tokens
    "none",  # no token has an adapter
]


def token_slots(pattern: str, num_tokens: int, num_slots: int, seed: int = 0) -> list[int]:
    """Per-token slot ids (-1 = no adapter) for a popularity pattern."""
    gen = torch.Generator().manual_seed(seed)
    T, S = num_tokens, num_slots
    match pattern:
        case "distinct":
            return [t % S for t in range(T)]
        case "uniform":
            return torch.randint(0, S, (T,), generator=gen).tolist()
        case "zipf":
            p = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(S)])
            return torch.multinomial(p, T, replacement=True, generator=gen).tolist()
        case "identical":
            return [S - 1] * T
        case "prefill":
            lengths = [max(1, T // 2), max(1, T // 5), 3, 1, 1, T]
            slots = [S - 1, -1, 0 % S, 1 % S, -1, 2 % S]
            out = [s for n, s in zip(lengths, slots, strict=True) for _ in range(n)]
            return out[:T]
        case "decode_none":
            return [-1 if t % 2 else (t // 2) % S for t in range(T)]
        case "single":
            return [S - 1]
        case "empty":
            return []
        case "none":
            return [-1] * T
    raise ValueError(pattern)


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.fixture
def make_slots() -> Callable[..., list[int]]:
    return token_slots


@pytest.fixture
def make_randn() -> Callable[..., torch.Tensor]:
    """Seeded N(0, scale^2) tensors; use scale=1/sqrt(fan_in) to keep outputs O(1)."""
    return randn


@pytest.fixture
def assert_close() -> Callable[..., None]:
    """Compare a kernel's output with the reference's, with the tolerance of the reference's dtype."""

    def check(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
        torch.testing.assert_close(
            actual, expected, **TOLERANCES[expected.dtype], msg=lambda m: f"{what}\n{m}" if what else m
        )

    return check


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(params=PATTERNS)
def pattern(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["compiled", "torch"])
def gather_path(request: pytest.FixtureRequest):
    """The kernels whose gathered tokens go through the compiled CPU ops (where they build) or the torch forms."""
    from switchboard.kernels import cpu_adapters
    from switchboard.kernels.backend import Backend, get_kernels

    if request.param == "torch":
        return get_kernels(Backend.TORCH)
    if not cpu_adapters.compiled_adapters_available():
        pytest.skip(f"no C++ build here: {cpu_adapters.compiled_adapters_unavailable_reason()}")
    return get_kernels(Backend.COMPILED_CPU)

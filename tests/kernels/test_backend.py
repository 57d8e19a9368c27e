"""Backends are chosen once through a dict; every backend honours the same semantics."""

from __future__ import annotations

import pytest
import torch

from switchboard.kernels import cpu_adapters, cpu_backend
from switchboard.kernels.backend import (
    Backend,
    BackendUnavailable,
    default_backend,
    get_kernels,
    triton_unavailable_reason,
)
from switchboard.kernels.cpu_adapters import compiled_adapters_available, compiled_adapters_unavailable_reason
from switchboard.kernels.scale import segmented_scale
from switchboard.kernels.segments import build_segments
from switchboard.kernels.sgmv import lora_apply


def test_torch_and_reference_backends_always_load() -> None:
    assert get_kernels(Backend.TORCH).lora_apply is lora_apply
    assert get_kernels(Backend.TORCH).segmented_scale is segmented_scale
    assert get_kernels(Backend.REFERENCE).backend is Backend.REFERENCE
    assert get_kernels(Backend.TORCH) is get_kernels(Backend.TORCH)  # loaded once


def test_cpu_defaults_to_the_compiled_backend_where_it_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = Backend.COMPILED_CPU if compiled_adapters_available() else Backend.TORCH
    assert default_backend("cpu") is expected
    monkeypatch.setattr(cpu_adapters, "compiled_adapters_available", lambda: False)
    assert default_backend("cpu") is Backend.TORCH  # no compiler here: the torch path


def test_the_compiled_backend_loads_or_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    if compiled_adapters_available():
        kernels = get_kernels(Backend.COMPILED_CPU)
        assert kernels.backend is Backend.COMPILED_CPU and kernels.kron_apply is cpu_backend.kron_apply
    monkeypatch.setattr(cpu_adapters, "compiled_adapters_unavailable_reason", lambda: "no compiler")
    get_kernels.cache_clear()
    try:
        with pytest.raises(BackendUnavailable, match="no compiler"):
            get_kernels(Backend.COMPILED_CPU)
    finally:
        get_kernels.cache_clear()


@pytest.mark.parametrize("backend", [Backend.REFERENCE, Backend.TORCH, Backend.COMPILED_CPU])
def test_every_kernel_of_a_backend_runs_on_one_mixed_batch(backend: Backend, make_randn) -> None:
    if backend is Backend.COMPILED_CPU and not compiled_adapters_available():
        pytest.skip(f"no C++ build here: {compiled_adapters_unavailable_reason()}")
    k = get_kernels(backend)
    ref = get_kernels(Backend.REFERENCE)
    seg = build_segments([1, 1, -1, 0])
    x = make_randn(4, 16, dtype=torch.float32)
    A, B = make_randn(2, 4, 16, dtype=torch.float32), make_randn(2, 8, 4, dtype=torch.float32)
    W1, W2 = make_randn(2, 2, 4, dtype=torch.float32), make_randn(2, 4, 4, dtype=torch.float32)
    V = make_randn(2, 16, dtype=torch.float32)
    y = torch.zeros(4, 8)
    torch.testing.assert_close(k.lora_apply(y.clone(), x, A, B, seg), ref.lora_apply(y.clone(), x, A, B, seg))
    torch.testing.assert_close(k.kron_apply(y.clone(), x, W1, W2, seg), ref.kron_apply(y.clone(), x, W1, W2, seg))
    torch.testing.assert_close(k.segmented_scaled(x, V, seg), ref.segmented_scale(x.clone(), V, seg))


def test_triton_backend_loads_or_says_why() -> None:
    reason = triton_unavailable_reason()
    if reason is None:
        assert get_kernels(Backend.TRITON).backend is Backend.TRITON
    else:
        with pytest.raises(BackendUnavailable, match="triton"):
            get_kernels(Backend.TRITON)

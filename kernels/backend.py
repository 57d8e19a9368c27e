"""Choose the adapter kernels once, by backend, through a dict: callers hold an `AdapterKernels` and never branch.

- REFERENCE: float32 loops over tokens, the spec and the test oracle (slow).
- TORCH: the fast torch path (runs on any device).
- COMPILED_CPU: TORCH with the gathered (decode) tokens in C++ ops (`cpu_backend`, `cpu_adapters`), the CPU choice
  where they build (a C++ compiler at first start; cached per machine).
- TRITON: Triton shrink, expand and scale (KronA stays on torch: its factors are tiny matmuls); needs CUDA. On CPU
  tensors the kernels run only under Triton's interpreter: TRITON_INTERPRET=1 set before `triton` is first imported
  (torch._dynamo imports it too), and not in bfloat16 (the interpreter's tl.dot misreads bf16, triton#11584).
  Triton is imported only by its loader.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import cpu_adapters, cpu_backend, kron, scale, sgmv
from .segments import MIN_GEMM_RUN, Segments
from .sgmv import PackedLora


class Backend(enum.Enum):
    REFERENCE = "reference"
    TORCH = "torch"
    TRITON = "triton"
    COMPILED_CPU = "compiled-cpu"


@dataclass(frozen=True, slots=True)
class AdapterKernels:
    """One backend's kernels; each has the signature and semantics of the torch function of the same name."""

    backend: Backend
    lora_shrink: Callable[[Tensor, Tensor, Segments], Tensor]  # (x, A, seg) -> h
    lora_expand: Callable[[Tensor, Tensor, Tensor, Segments], Tensor]  # (y, h, B, seg) -> y
    lora_apply: Callable[[Tensor, Tensor, Tensor, Tensor, Segments], Tensor]  # (y, x, A, B, seg) -> y
    lora_packed: Callable[[Tensor, Tensor, PackedLora, Segments], Tensor]  # (y, x, sgmv.pack_lora(A, parts), seg)
    kron_apply: Callable[[Tensor, Tensor, Tensor, Tensor, Segments], Tensor]  # (y, x, W1, W2, seg) -> y
    segmented_scale: Callable[[Tensor, Tensor, Segments], Tensor]  # (x, V, seg) -> x, in place
    segmented_scaled: Callable[[Tensor, Tensor, Segments], Tensor]  # (x, V, seg) -> new tensor
    min_gemm_run: int = MIN_GEMM_RUN  # runs this long take matmuls (`Segments.long_runs`), shorter ones the gather


class BackendUnavailable(RuntimeError):
    """The requested backend cannot be loaded here (the message says why)."""


def _reference_scaled(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    return scale.segmented_scale_ref(x.clone(memory_format=torch.contiguous_format), V, seg)


def _packed_from(
    shrink: Callable[[Tensor, Tensor, Segments], Tensor], expand: Callable[[Tensor, Tensor, Tensor, Segments], Tensor]
) -> Callable[[Tensor, Tensor, PackedLora, Segments], Tensor]:
    """`lora_packed` as one shrink and an expand per part (h rounded to x's dtype in between)."""

    def packed(y: Tensor, x: Tensor, lora: PackedLora, seg: Segments) -> Tensor:
        h = shrink(x, lora.A, seg)
        for B, col, row in lora.parts:
            expand(y[:, col : col + B.shape[1]], h[:, row : row + B.shape[2]], B, seg)
        return y

    return packed


def _load_reference() -> AdapterKernels:
    return AdapterKernels(
        backend=Backend.REFERENCE,
        lora_shrink=sgmv.lora_shrink_ref,
        lora_expand=sgmv.lora_expand_ref,
        lora_apply=sgmv.lora_apply_ref,
        lora_packed=sgmv.lora_packed_ref,
        kron_apply=kron.kron_apply_ref,
        segmented_scale=scale.segmented_scale_ref,
        segmented_scaled=_reference_scaled,
    )


def _load_torch() -> AdapterKernels:
    return AdapterKernels(
        backend=Backend.TORCH,
        lora_shrink=sgmv.lora_shrink,
        lora_expand=sgmv.lora_expand,
        lora_apply=sgmv.lora_apply,
        lora_packed=sgmv.lora_packed,
        kron_apply=kron.kron_apply,
        segmented_scale=scale.segmented_scale,
        segmented_scaled=scale.segmented_scaled,
    )


def _load_triton() -> AdapterKernels:
    reason = triton_unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(reason)
    from . import triton_scale, triton_sgmv

    return AdapterKernels(
        backend=Backend.TRITON,
        lora_shrink=triton_sgmv.triton_lora_shrink,
        lora_expand=triton_sgmv.triton_lora_expand,
        lora_apply=triton_sgmv.triton_lora_apply,
        lora_packed=_packed_from(triton_sgmv.triton_lora_shrink, triton_sgmv.triton_lora_expand),
        kron_apply=kron.kron_apply,
        segmented_scale=triton_scale.triton_segmented_scale,
        segmented_scaled=triton_scale.triton_segmented_scaled,
    )


def _load_compiled_cpu() -> AdapterKernels:
    reason = cpu_adapters.compiled_adapters_unavailable_reason()  # builds the ops on first use
    if reason is not None:
        raise BackendUnavailable(f"the compiled CPU ops cannot be built here: {reason}")
    return replace(  # the torch kernels, with the gathered tokens of every kind in the compiled ops
        _load_torch(),
        backend=Backend.COMPILED_CPU,
        lora_packed=cpu_backend.lora_packed,
        kron_apply=cpu_backend.kron_apply,
        segmented_scale=cpu_backend.segmented_scale,
        segmented_scaled=cpu_backend.segmented_scaled,
        min_gemm_run=cpu_backend.MIN_GEMM_RUN,
    )


_LOADERS: dict[Backend, Callable[[], AdapterKernels]] = {
    Backend.REFERENCE: _load_reference,
    Backend.TORCH: _load_torch,
    Backend.TRITON: _load_triton,
    Backend.COMPILED_CPU: _load_compiled_cpu,
}


def triton_unavailable_reason() -> str | None:
    """None when the `triton` package can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


@functools.cache
def get_kernels(backend: Backend) -> AdapterKernels:
    """The kernels of `backend`, loaded once. Raises BackendUnavailable (TRITON without the package, COMPILED_CPU
    where the ops cannot be built)."""
    return _LOADERS[backend]()


def default_backend(device: torch.device | str) -> Backend:
    """TRITON on a CUDA device when Triton is installed; COMPILED_CPU on the CPU where the ops build (building them
    on first use); else TORCH."""
    kind = torch.device(device).type
    if kind == "cuda":
        return Backend.TRITON if triton_unavailable_reason() is None else Backend.TORCH
    if kind == "cpu" and cpu_adapters.compiled_adapters_available():
        return Backend.COMPILED_CPU
    return Backend.TORCH

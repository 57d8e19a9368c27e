"""Pure tensor kernels that apply many adapters to one flattened token batch (imports only torch; Triton is
loaded on demand by `backend.get_kernels(Backend.TRITON)`).

- segments: per-step batch metadata (`Segments`, `build_segments`)
- sgmv: LoRA shrink / expand / apply (allocate slots k-major for the fastest decode path: see sgmv.py)
- kron: KronA without materialising the Kronecker product
- scale: (IA)3 segmented scaling
- backend: `Backend`, `AdapterKernels`, `get_kernels`, `default_backend`
- bench: `python -m switchboard.kernels.bench`
- bench_stream: `python -m switchboard.kernels.bench_stream`, how fast the compiled LoRA op reads adapter weights
  from memory, against a plain read of the same tensors
"""

from .backend import AdapterKernels, Backend, BackendUnavailable, default_backend, get_kernels
from .kron import kron_apply, kron_apply_ref
from .scale import segmented_scale, segmented_scale_ref, segmented_scaled
from .segments import MIN_GEMM_RUN, NO_SLOT, Gather, Segments, build_segments
from .sgmv import (
    is_k_major,
    lora_apply,
    lora_apply_ref,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    to_k_major,
)

__all__ = [
    "MIN_GEMM_RUN",
    "NO_SLOT",
    "AdapterKernels",
    "Backend",
    "BackendUnavailable",
    "Gather",
    "Segments",
    "build_segments",
    "default_backend",
    "get_kernels",
    "is_k_major",
    "kron_apply",
    "kron_apply_ref",
    "lora_apply",
    "lora_apply_ref",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "segmented_scale",
    "segmented_scale_ref",
    "segmented_scaled",
    "to_k_major",
]

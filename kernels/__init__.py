"""Pure tensor kernels that apply many adapters to one flattened token batch (imports only torch; Triton is
loaded on demand by `backend.get_kernels(Backend.TRITON)`).

- segments: per-step batch metadata (`Segments`, `build_segments`)
- sgmv: LoRA shrink / expand / apply
- kron: KronA without materialising the Kronecker product
- scale: (IA)3 segmented scaling
- backend: `Backend`, `AdapterKernels`, `get_kernels`, `default_backend`
"""

from .backend import AdapterKernels, Backend, BackendUnavailable, default_backend, get_kernels
from .kron import kron_apply, kron_apply_ref
from .scale import segmented_scale, segmented_scale_ref, segmented_scaled
from .segments import NO_SLOT, Segments, build_segments
from .sgmv import lora_apply, lora_apply_ref, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

__all__ = [
    "NO_SLOT",
    "AdapterKernels",
    "Backend",
    "BackendUnavailable",
    "Segments",
    "build_segments",
    "default_backend",
    "get_kernels",
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
]

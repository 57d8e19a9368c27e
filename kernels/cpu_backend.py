"""The compiled CPU backend (`Backend.COMPILED_CPU`): the torch backend with the gathered (decode) tokens of a step
sent to the C++ ops of `cpu_adapters`, one call per linear.

Chosen once, where the ops are built (`backend.default_backend` on the CPU). Long runs (prefill chunks) stay on the
torch forms, which do them as GEMMs; so do operands the ops cannot take (`cpu_adapters.operands_fit`: a row stride
that is not 1, a stack that is not contiguous, a tensor off the CPU), checked per call since strides vary by call.
Each function has the semantics of the torch function of the same name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_adapters, kron, scale, sgmv
from .segments import Segments
from .sgmv import PackedLora

# Runs (prefill chunks of one adapter) at least this long take matmuls; shorter ones go to the compiled ops with the
# decode tokens. The torch gather form broke even with a matmul near 64 tokens, the compiled ops near 256: on the
# real model with 32 distinct LoRA r=8 adapters, W's 64-token prompts through the ops ran 433 tok/s against 421 as
# matmuls (paired), and 256-token prompts took as long either way.
MIN_GEMM_RUN = 128


def lora_packed(y: Tensor, x: Tensor, lora: PackedLora, seg: Segments) -> Tensor:
    """`sgmv.lora_packed`; the gathered tokens in one compiled call where `pack_lora` derived the op's operands."""
    g = seg.gather
    if g.num_tokens:
        c = lora.compiled
        if c is not None and cpu_adapters.rows_apply(y, x):
            cpu_adapters.lora_packed_gather_lists(
                y, x, g.token_slots, c.a_storage, c.b_storages, c.cols, c.rows, c.rank, c.coded
            )
        else:
            sgmv.lora_packed_gathered(y, x, lora, seg)
    return sgmv.lora_packed_long_runs(y, x, lora, seg)


def kron_apply(y: Tensor, x: Tensor, W1: Tensor, W2: Tensor, seg: Segments) -> Tensor:
    """`kron.kron_apply`; the gathered tokens in one compiled call (one pass per token, no padding)."""
    g = seg.gather
    if g.num_tokens:
        if cpu_adapters.operands_fit((y, x), (W1, W2)):
            cpu_adapters.kron_gather(y, x, g.token_slots, W1, W2)
        else:
            kron.kron_gathered(y, x, W1, W2, g)
    return kron.kron_long_runs(y, x, W1, W2, seg)


def segmented_scale(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """`scale.segmented_scale`; the gathered tokens in one compiled call."""
    g = seg.gather
    if g.num_tokens:
        if cpu_adapters.operands_fit((x,), (V,)):
            cpu_adapters.scale_gather(x, g.token_slots, V)
        else:
            scale.scale_gathered(x, V, g)
    return scale.scale_long_runs(x, V, seg)


def segmented_scaled(x: Tensor, V: Tensor, seg: Segments) -> Tensor:
    """`scale.segmented_scaled`: `segmented_scale` on a contiguous copy of x."""
    return segmented_scale(x.clone(memory_format=torch.contiguous_format), V, seg)

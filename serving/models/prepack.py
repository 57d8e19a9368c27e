"""bf16 base weights packed once, for CPU products that do not re-pack every call.

`F.linear` on bf16 CPU tensors runs oneDNN's matmul, which reorders the plain [out, in] weight into its blocked
layout on every call: at decode sizes (32 rows) the reorder costs about as much as the product. Two packed products
remove it:
- `CompiledLinear`, on a CPU with AVX-512 BF16: our own kernel (switchboard.kernels.cpu_linear) over its own packed
  copy, faster than oneDNN's product at every row count a step has. It sums in another order than oneDNN, so an
  output can differ from F.linear's by one bf16 step.
- `PackedLinear` elsewhere: oneDNN's blocked copy (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU
  weight freezing does) multiplied with `_linear_pointwise`: bit-identical to F.linear (the same oneDNN kernel runs,
  minus the reorder).

Applied from outside the model, like quant.py: `prepack_bf16(model)` sets each dense AdapterLinear's base product,
and the model's logits product, to one reading a packed copy. The packed copy is a snapshot: weights must not change
afterwards (the engine merges `--merge-adapter` first).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from switchboard.kernels import cpu_linear

from .linear import AdapterLinear
from .llama import LlamaModel

logger = logging.getLogger(__name__)


def prepack_available(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and device.type == "cpu" and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` over a weight packed once; same call signature, the weight argument unused."""

    def __init__(self, weight: torch.Tensor, batch_hint: int) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        # An opaque oneDNN tensor, not a Parameter: state_dict and weight_bytes still see the dense weight.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)

    def forward(self, x: torch.Tensor, _weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        # x: [T, in] -> [T, out]
        if x.shape[0] == 0:  # oneDNN refuses an empty batch
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")


class CompiledLinear(nn.Module):
    """`F.linear(x, weight, bias)` on the AVX-512 BF16 kernel over a copy packed once; the weight argument unused."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        # A flat buffer in the kernel's tile layout, not a Parameter: state_dict and weight_bytes see the dense weight.
        self.packed = cpu_linear.pack(weight.detach())

    def forward(self, x: torch.Tensor, _weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        # x: [T, in] -> [T, out]
        return cpu_linear.linear(x if x.stride(-1) == 1 else x.contiguous(), self.packed, bias, self.out_features)


# Which packed product `prepack_bf16` gives a weight: the engine's choice, or one forced (benchmarks and tests).
Product = Literal["auto", "onednn", "compiled"]


def packed_product(weight: torch.Tensor, batch_hint: int, product: Product = "auto") -> nn.Module:
    """A packed product for this bf16 weight. "auto": `CompiledLinear` where the engine chooses the kernel here
    (`cpu_linear.compiled_linear_available`) and it takes the shape, else oneDNN's `PackedLinear` (`batch_hint`: the
    usual row count, which oneDNN tunes for). "compiled": the kernel wherever it runs and takes the shape (an AMX CPU
    included). "onednn": always oneDNN's, bit-identical to F.linear."""
    if product != "onednn" and cpu_linear.shape_supported(*weight.shape):
        chosen = cpu_linear.kernel_runs_here() if product == "compiled" else cpu_linear.compiled_linear_available()
        if chosen:
            return CompiledLinear(weight)
    return PackedLinear(weight, batch_hint)


def prepack_bf16(model: LlamaModel, batch_hint: int, product: Product = "auto") -> int:
    """Pack every dense bf16 AdapterLinear (NF4 ones keep their own product) and the logits weight, each with
    `packed_product(weight, batch_hint, product)`; returns how many products were packed."""
    products: list[nn.Module] = []
    for module in list(model.modules()):
        if isinstance(module, AdapterLinear) and module.weight is not None and module.weight.dtype == torch.bfloat16:
            module.base_matmul = packed_product(module.weight, batch_hint, product)
            products.append(module.base_matmul)
    weight = model.logits_weight()
    if weight.dtype == torch.bfloat16:
        model.logits_matmul = packed_product(weight, batch_hint, product)
        products.append(model.logits_matmul)
    ours = sum(isinstance(p, CompiledLinear) for p in products)
    logger.info("bf16 products packed once: %d for the AVX-512 BF16 kernel, %d for oneDNN", ours, len(products) - ours)
    return len(products)

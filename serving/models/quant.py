"""NF4 base weights (QLoRA's 4-bit NormalFloat with double quantization), through bitsandbytes.

Applied from outside the model, as gpt-fast applies its quantizers: `quantize_nf4(model)` replaces each
`AdapterLinear`'s dense weight with an `NF4Linear` holding the codes, and sets it as that linear's base product.
Adapters are untouched: they run unmerged on top of the base's output (merging into NF4 would mean requantising).

Two products, chosen once per layer when it is quantised (`NF4Path`):
- `dequantize`: dequantise the layer's weight to the activation dtype and multiply (what bitsandbytes does in
  `matmul_4bit` outside its packed path). Any shape; the product is as exact as the activation dtype.
- `packed`: on CPUs with AVX-512 bf16, bitsandbytes' fused bf16 kernel over weights repacked in blocks of 32
  output rows (what `Linear4bit` switches to in eval mode). It needs out_features % 32 == 0 and in_features % 64
  == 0 (the quantization block), and bf16 activations; measured on the demo model's shapes it matches a dense bf16
  product at decode batch sizes, where `dequantize` takes 2.3x as long.
`auto` takes `packed` where a layer allows it and `dequantize` elsewhere, so no shape ever hits bitsandbytes'
assertion; asking for `packed` on a layer that cannot be packed is a ValueError naming the layer.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .linear import AdapterLinear

logger = logging.getLogger(__name__)

NF4Path = Literal["auto", "dequantize", "packed"]
BLOCKSIZE = 64  # QLoRA's block of weights per absmax constant (the constants are quantised again in blocks of 256)
PACK_ROWS = 32  # bitsandbytes' CPU repacking groups output rows by 32


def cpu_packing_available() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def packing_blocker(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why this layer cannot use the packed bf16 kernel, or None if it can."""
    if device.type != "cpu" or not cpu_packing_available():
        return "the packed kernel needs a CPU with AVX-512 bf16"
    if dtype != torch.bfloat16:
        return f"the packed kernel computes in bfloat16, the model runs in {dtype}"
    if out_features % PACK_ROWS:
        return f"out_features {out_features} is not a multiple of {PACK_ROWS}"
    if in_features % BLOCKSIZE:
        return f"in_features {in_features} is not a multiple of the quantization block {BLOCKSIZE}"
    return None


_CODEBOOKS: dict[tuple[object, ...], torch.Tensor] = {}


def _share_codebooks(state: object) -> object:
    """Point the state's codebooks (16 NF4 levels; 256 levels for the constants' own quantization) at one shared
    copy: bitsandbytes allocates them per layer, 1 KiB per projection, identical values, never written."""
    for holder in (state, state.state2) if state.nested else (state,):
        key = (str(holder.code.device), *holder.code.tolist())
        holder.code = _CODEBOOKS.setdefault(key, holder.code)
    return state


class NF4Linear(nn.Module):
    """A frozen [out, in] weight held as NF4 codes with double-quantised block constants; multiplies like F.linear.

    A packed weight (q|k|v, gate|up) is quantised part by part, each as its own Hugging Face projection: double
    quantization's offset and second-level blocks then span the same values as in transformers' load_in_4bit, so
    the codes and constants are identical to a QLoRA training base's (tests assert it), not merely close.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        compute_dtype: torch.dtype,
        path: NF4Path = "auto",
        name: str = "",
        splits: list[int] | None = None,
    ) -> None:
        super().__init__()
        import bitsandbytes.functional as bnbf

        out_features, in_features = weight.shape
        splits = splits or [out_features]
        blockers = [packing_blocker(rows, in_features, compute_dtype, weight.device) for rows in splits]
        blocker = next((b for b in blockers if b is not None), None)
        if path == "packed" and blocker is not None:
            raise ValueError(f"{name or 'layer'}: cannot use the packed NF4 kernel: {blocker}")
        if path == "auto":
            path = "dequantize" if blocker is not None else "packed"
        self.path: NF4Path = path
        self.shape = (out_features, in_features)
        self.compute_dtype = compute_dtype
        self.parts: list[tuple[torch.Tensor, object]] = []  # (codes, bitsandbytes QuantState) per part
        for rows in weight.float().split(splits):
            # Quantise the float32 values, as transformers' load_in_4bit does from a float32 load.
            codes, state = bnbf.quantize_4bit(
                rows.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
            )
            if path == "packed":
                codes, state = bnbf._convert_weight_packed_for_cpu(codes, state)  # as Linear4bit does in eval mode
            self.parts.append((codes, _share_codebooks(state)))
        self._gemv = bnbf.gemv_4bit
        self._dequantize = bnbf.dequantize_4bit

    def dequantized(self) -> torch.Tensor:
        """The weight as the products see it, in float32 ([out, in]); tests compare references built from it."""
        if self.path == "packed":
            eye = torch.eye(self.shape[1], dtype=torch.bfloat16, device=self.parts[0][0].device)
            return torch.cat([self._gemv(eye, c, state=s).float().T for c, s in self.parts])
        return torch.cat([self._dequantize(c, s).float() for c, s in self.parts])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held: codes, block constants, their own constants (double quantization), codebooks."""
        out = []
        for codes, state in self.parts:
            out += [codes, state.absmax, state.code]
            if state.nested:
                out += [state.state2.absmax, state.state2.code, state.offset]
        return out

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in self.tensors()}.values())

    def forward(self, x: torch.Tensor, _weight: None, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, in] -> [T, out]; same signature as F.linear so that AdapterLinear calls either alike
        if self.path == "packed":
            outs = [self._gemv(x, c, state=s) for c, s in self.parts]
            y = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)).to(x.dtype)
            return y if bias is None else y + bias
        weights = [self._dequantize(c, s).to(x.dtype) for c, s in self.parts]
        return F.linear(x, weights[0] if len(weights) == 1 else torch.cat(weights), bias)


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype, path: NF4Path = "auto") -> dict[str, int]:
    """Replace every AdapterLinear's dense weight by NF4 codes; returns how many layers took each product."""
    paths = {"dequantize": 0, "packed": 0}
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLinear):
            continue
        assert module.weight is not None, f"{name} is already quantised"
        splits = [part.stop - part.start for part in module.parts]
        nf4 = NF4Linear(module.weight.data, compute_dtype, path, name, splits)
        module.weight = None
        module.base_matmul = nf4
        paths[nf4.path] += 1
    if paths["dequantize"] and paths["packed"]:
        logger.info(
            "NF4: %d layers use the packed bf16 kernel, %d dequantise (shapes it cannot pack)",
            paths["packed"],
            paths["dequantize"],
        )
    return paths


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the base weights: the linears (NF4 or dense) and everything else (embeddings, norms, lm_head).

    Tensors that share storage are counted once (the codebooks every NF4 layer shares).
    """
    linear: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, NF4Linear):
            linear.update((t.data_ptr(), t) for t in module.tensors())
        elif isinstance(module, AdapterLinear):  # the dense weight, or only the bias once quantised
            linear.update((p.data_ptr(), p) for p in module.parameters(recurse=False))
    other = {p.data_ptr(): p for p in model.parameters() if p.data_ptr() not in linear}
    count = lambda ts: sum(t.numel() * t.element_size() for t in ts.values())  # noqa: E731
    return {"linear": count(linear), "other": count(other), "total": count(linear) + count(other)}


def dense_linear_parameters(model: nn.Module) -> int:
    """Parameters of the linears as dense matrices (to compare NF4 bytes with 16-bit bytes)."""
    total = 0
    for module in model.modules():
        if isinstance(module, AdapterLinear):
            total += module.out_features * module.in_features + (0 if module.bias is None else module.out_features)
    return total

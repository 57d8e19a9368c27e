"""The frozen base model for training: float32, or NF4 with double quantization through bitsandbytes (QLoRA)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel


def nf4_config(compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    """QLoRA's recipe: NF4 codes, blocks of 64, the block constants themselves quantised (double quantization)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit linear on its dequantise-and-multiply path (compute in its compute dtype).

    On CPUs with AVX-512 bf16, `Linear4bit` repacks its weight on the first no-grad forward in eval mode and from
    then on multiplies in bf16 (and asserts out_features % 32 == 0); a repacked weight also has no backward, so a
    training run that evaluates would stop training the layers below. Returns how many layers were switched.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base(model_dir: Path, quantize: str, device: str = "cpu") -> PreTrainedModel:
    """float32 weights, or NF4 linears (embeddings, norms and lm_head stay float32, as transformers keeps them)."""
    if quantize == "nf4":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, quantization_config=nf4_config(), device_map={"": device}
        )
        disable_cpu_repacking(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model

"""Greedy decoding by plain forward passes: the reference the tests hold our engine to, for the base model and every
adapter kind, and the held-out check of a trained adapter (demo.py).

Each step runs the whole sequence through the model and appends the argmax of the last position's logits: no KV
cache and no `generate`, so the tokens follow from exactly the forward pass whose logits the tests compare. A
`generate` is not that: PEFT's prefix-tuning `generate` leaves the prefix out on transformers >= 5.24 while its
forward applies it. A forward of the whole sequence per token costs milliseconds on the test and demo models.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedModel


@torch.inference_mode()
def greedy_tokens(model: PreTrainedModel | PeftModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The `max_new_tokens` tokens that greedy decoding appends to `prompt`; EOS does not stop it (like ignore_eos).

    `model`: a causal LM in float32 and eval mode, transformers' or PEFT's; `model(input_ids=ids).logits`, ids [1, S],
    gives [1, S, V].
    """
    if model.dtype != torch.float32 or model.training:
        raise ValueError(f"the reference runs in float32 and eval mode, not {model.dtype} (training={model.training})")
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # [V]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]

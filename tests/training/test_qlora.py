"""`switchboard train --quantize nf4` (QLoRA): adapters trained in float32 on an NF4 base (bitsandbytes, double
quantization), then served on our NF4 base with the same codes; plus the kinds PEFT cannot train on 4 bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.training.base import load_base
from switchboard.training.config import TrainConfig
from switchboard.training.trainer import TrainResult, train

from .test_train import PROMPT


@pytest.fixture(scope="module")
def qlora(tiny_model_dir: Path, persona_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    root = tmp_path_factory.mktemp("qlora")
    out = {}
    for kind in ("lora", "prefix"):
        cfg = TrainConfig(
            model=tiny_model_dir,
            kind=kind,
            data=persona_data,
            out=root / kind,
            quantize="nf4",
            epochs=4,
            progress=False,
        )
        out[kind] = train(cfg)
    return out


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_qlora_learns_and_our_nf4_engine_serves_it_like_peft(
    kind: str, qlora: dict[str, TrainResult], tiny_model_dir: Path
) -> None:
    result = qlora[kind]
    assert result.log["config"]["quantize"] == "nf4"
    assert result.eval_losses[-1] <= 0.5 * result.eval_losses[0], result.eval_losses
    assert result.log["trainable_parameters"] > 0
    engine = LLMEngine(
        ServeConfig(
            model=tiny_model_dir, dtype="float32", quantize="nf4", num_kv_blocks=32, adapters={kind: result.out}
        )
    )
    peft = PeftModel.from_pretrained(load_base(tiny_model_dir, "nf4"), result.out).eval()
    with torch.inference_mode():
        ref = peft(input_ids=torch.tensor([PROMPT])).logits[0]
    assert (engine.prompt_logits(PROMPT, kind) - ref).abs().max().item() <= 1e-4


def test_krona_on_nf4_is_refused_with_the_reason(tiny_model_dir: Path, persona_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LoKr does not support 4-bit"):
        TrainConfig(model=tiny_model_dir, kind="krona", data=persona_data, out=tmp_path / "k", quantize="nf4")

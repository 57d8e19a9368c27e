"""`switchboard train` for every kind: it learns, it is deterministic, and PEFT and our engine serve it alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.training.config import TrainConfig
from switchboard.training.trainer import LOG_FILE, TrainResult, train

from .conftest import KINDS

PROMPT = [0, 45, 300, 12, 77, 401, 9, 230, 18, 64, 99, 150]


@pytest.mark.parametrize("kind", KINDS)
def test_held_out_loss_falls_by_half(kind: str, trained: dict[str, TrainResult]) -> None:
    losses = trained[kind].eval_losses
    assert len(losses) == 5  # before training and after each of 4 epochs
    assert losses[-1] <= 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_a_peft_directory_with_a_training_log(kind: str, trained: dict[str, TrainResult]) -> None:
    out = trained[kind].out
    assert out is not None
    assert {"adapter_config.json", "adapter_model.safetensors", LOG_FILE} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(f".{kind}.*"))  # no staging directory left behind
    peft_type = json.loads((out / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == {"lora": "LORA", "krona": "LOKR", "ia3": "IA3", "prefix": "PREFIX_TUNING"}[kind]
    log = json.loads((out / LOG_FILE).read_text())
    assert log["config"]["kind"] == kind
    assert [e["epoch"] for e in log["eval"]] == [0, 1, 2, 3, 4]
    assert len(log["steps"]) == 4 * 14  # 108 training rows in batches of 8, one optimizer step each
    assert all(s["loss"] > 0 for s in log["steps"])
    assert 0 < log["trainable_parameters"] < log["total_parameters"]
    assert log["peak_memory_bytes"] >= log["peak_memory_over_start_bytes"] > 0 and log["tokens_per_second"] > 0


def test_krona_has_two_full_kronecker_factors(trained: dict[str, TrainResult]) -> None:
    out = trained["krona"].out
    assert out is not None
    leaves = {k.rsplit(".", 1)[-1] for k in load_file(out / "adapter_model.safetensors")}
    assert leaves == {"lokr_w1", "lokr_w2"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, trained: dict[str, TrainResult]) -> LLMEngine:
    adapters = {kind: result.out for kind, result in trained.items()}
    return LLMEngine(ServeConfig(model=tiny_model_dir, dtype="float32", num_kv_blocks=64, adapters=adapters))


@pytest.mark.parametrize("kind", KINDS)
def test_trained_adapter_served_by_our_engine_matches_peft(
    kind: str, engine: LLMEngine, tiny_model_dir: Path, trained: dict[str, TrainResult]
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, trained[kind].out).eval()
    with torch.inference_mode():
        ref = peft(input_ids=torch.tensor([PROMPT])).logits[0]
        with peft.disable_adapter():
            plain = peft(input_ids=torch.tensor([PROMPT])).logits[0]
    ours = engine.prompt_logits(PROMPT, kind)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ref - plain).abs().max().item() > 1e-1  # training really moved the adapter


def _lora(model_dir: Path, data: Path, out: Path, **kw) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(model=model_dir, kind="lora", data=data, out=out, max_steps=3, progress=False, **kw)
    train(cfg)
    return load_file(out / "adapter_model.safetensors")


def test_seeded_runs_are_identical_and_grad_accum_matches_a_larger_batch(
    tiny_model_dir: Path, persona_data: Path, tmp_path: Path
) -> None:
    a = _lora(tiny_model_dir, persona_data, tmp_path / "a", seed=3, dropout=0.1)
    b = _lora(tiny_model_dir, persona_data, tmp_path / "b", seed=3, dropout=0.1)
    c = _lora(tiny_model_dir, persona_data, tmp_path / "c", seed=4, dropout=0.1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # 2 micro-batches of 4 accumulate to the gradient of one batch of 8 (the loss is normalised per step)
    big = _lora(tiny_model_dir, persona_data, tmp_path / "big", seed=5, batch_size=8)
    accum = _lora(tiny_model_dir, persona_data, tmp_path / "accum", seed=5, batch_size=4, grad_accum=2)
    assert all(torch.allclose(big[k], accum[k], atol=1e-5) for k in big)

"""Our model's logits equal transformers' on the same checkpoint (fp32, max abs difference <= 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from switchboard.serving.models.attention import AttentionMetadata, KVCache, build_group
from switchboard.serving.models.config import ModelConfig, UnsupportedModelError
from switchboard.serving.models.loader import load_model

SMALL = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
CASES = {
    "llama-gqa": (LlamaForCausalLM, LlamaConfig(**SMALL, num_key_value_heads=2)),
    "llama3-rope-scaling": (
        LlamaForCausalLM,
        LlamaConfig(
            **SMALL,
            num_key_value_heads=1,
            max_position_embeddings=512,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-linear-rope": (
        LlamaForCausalLM,
        LlamaConfig(**SMALL, num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "qwen2-qkv-bias": (Qwen2ForCausalLM, Qwen2Config(**SMALL, num_key_value_heads=2)),
    "tied-embeddings": (LlamaForCausalLM, LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": (MistralForCausalLM, MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None)),
}


def _save(tmp_path: Path, name: str, shard: bool = False) -> Path:
    cls, cfg = CASES[name]
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():  # a larger init than the default 0.02, so a wrong op cannot hide in tiny values
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif pname.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0, 0.1)
    out = tmp_path / name
    model.save_pretrained(out, max_shard_size="100KB" if shard else "10GB")
    return out


def ours_logits(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-sequence logits through the serving path: one prefill chunk written to a paged cache."""
    model = load_model(model_dir, dtype)
    cfg = model.cfg
    t = ids.numel()
    block = 16
    blocks = list(range(-(-t // block)))
    cache = KVCache(cfg.num_layers, len(blocks), block, cfg.num_kv_heads, cfg.head_dim, dtype, torch.device("cpu"))
    meta = AttentionMetadata(
        torch.arange(t), [build_group(0, [t], [t], [blocks], block, torch.device("cpu"), cache.pad_slot)]
    )
    with torch.inference_mode():
        return model.logits(model(ids, torch.arange(t), cache.data, meta))


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    model_dir = _save(tmp_path, name, shard=name == "llama-gqa")
    if name == "llama-gqa":
        assert (model_dir / "model.safetensors.index.json").is_file()  # the sharded path is exercised
    ids = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(1))
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = ref_model(ids[None]).logits[0].float()
    ours = ours_logits(model_dir, ids)
    assert ref.abs().max() > 0.1  # the comparison is not between near-zero tensors
    assert (ours - ref).abs().max().item() <= 1e-4


def test_bf16_close_to_fp32(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, "llama-gqa")
    ids = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(2))
    full = ours_logits(model_dir, ids)
    half = ours_logits(model_dir, ids, torch.bfloat16)
    assert (full - half).abs().max().item() < 0.1 * full.abs().max().item()


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="supported model types: llama, mistral, qwen2"):
        ModelConfig.from_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, "llama-gqa")
    (model_dir / "model.safetensors").unlink(missing_ok=True)
    for f in model_dir.glob("model-*.safetensors"):
        f.unlink()
    (model_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    (model_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="only safetensors"):
        load_model(model_dir)

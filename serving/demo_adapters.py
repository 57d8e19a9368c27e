"""Demo adapters of every kind, built with PEFT on a base checkpoint, seeded and non-zero (so they visibly act).

`make serve` registers them where no trained demo adapters exist (`make demo-adapters`); the tests build the same
kinds on the tiny checkpoint. Their output is noise: they exercise the serving path.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PeftConfig, PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from switchboard.adapters_store.kinds.base import ALL_LINEAR, ATTENTION


def demo_configs() -> dict[str, PeftConfig]:
    """One adapter per kind, as `make serve` registers them (name -> PEFT config)."""
    return {
        "demo-lora": LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_LINEAR), init_lora_weights=False),
        "demo-krona": LoKrConfig(r=8, alpha=8, target_modules=list(ATTENTION), init_weights=False),
        "demo-ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
        "demo-prefix": PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"),
    }


def seed_adapter_weights(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Seeded, clearly non-zero trainable weights: (IA)3 vectors around one, prefixes N(0, 1), factors N(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * noise)
            elif "prompt_encoder" in name:
                p.copy_(noise)
            else:
                p.copy_(scale * noise)


def build_adapter(model_dir: Path, config: PeftConfig, out_dir: Path, seed: int) -> Path:
    """Save one PEFT adapter for `model_dir` into `out_dir` (built aside, then renamed into place)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, config)
    seed_adapter_weights(model, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def ensure_demo_adapters(model_dir: Path, out_root: Path) -> dict[str, Path]:
    """Build the demo adapters under `out_root` unless present; name -> directory."""
    out: dict[str, Path] = {}
    for seed, (name, config) in enumerate(demo_configs().items(), start=1):
        out[name] = out_root / name
        if not (out[name] / "adapter_model.safetensors").is_file():
            build_adapter(model_dir, config, out[name], seed)
    return out

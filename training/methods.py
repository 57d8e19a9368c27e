"""One PEFT configuration per adapter kind, built from the TrainConfig (PEFT owns the modules and their init)."""

from __future__ import annotations

from peft import IA3Config, LoKrConfig, LoraConfig, PeftConfig, PrefixTuningConfig
from peft.tuners.lokr.layer import factorization
from transformers import PretrainedConfig

from switchboard.adapters_store.kinds.base import ALL_LINEAR, BaseModelShape

from .config import TrainConfig, TrainKind


def krona_rank(cfg: TrainConfig, model_config: PretrainedConfig) -> int:
    """The smallest LoKr `r` for which PEFT keeps w2 a full matrix on every target (it factors w2 when
    r < max(w2 dims) / 2; w1 is always full without decompose_both): KronA's two full Kronecker factors."""
    shape = BaseModelShape.from_hf_config(model_config.to_dict())
    need = 1
    for name in cfg.target_modules or ():
        if name not in ALL_LINEAR:
            raise ValueError(f"--target-modules: unknown projection {name!r}; choose from {', '.join(ALL_LINEAR)}")
        d_out, d_in = shape.module_shape(name)
        w2 = (factorization(d_out, cfg.decompose_factor)[1], factorization(d_in, cfg.decompose_factor)[1])
        need = max(need, -(-max(w2) // 2))
    return need


def peft_config(cfg: TrainConfig, model_config: PretrainedConfig) -> PeftConfig:
    targets = list(cfg.target_modules or ())
    if cfg.kind is TrainKind.LORA:
        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            use_rslora=cfg.use_rslora,
            task_type="CAUSAL_LM",
        )
    if cfg.kind is TrainKind.KRONA:
        r = krona_rank(cfg, model_config)
        return LoKrConfig(
            r=r,
            alpha=cfg.krona_scale * r,  # PEFT scales the delta by alpha / r
            module_dropout=cfg.dropout,
            decompose_factor=cfg.decompose_factor,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
    if cfg.kind is TrainKind.IA3:
        return IA3Config(
            target_modules=targets, feedforward_modules=list(cfg.feedforward_modules), task_type="CAUSAL_LM"
        )
    if cfg.kind is TrainKind.PREFIX:
        # No reparametrisation MLP: the saved prompt_embeddings are the keys and values the server writes.
        return PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=False, task_type="CAUSAL_LM"
        )
    raise ValueError(f"{cfg.kind} is not an adapter kind")

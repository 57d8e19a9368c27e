"""The training run's one configuration dataclass, validated once and passed down whole."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from switchboard.adapters_store.kinds.base import ALL_LINEAR


class TrainKind(StrEnum):
    LORA = "lora"
    KRONA = "krona"
    IA3 = "ia3"
    PREFIX = "prefix"
    FULL = "full"  # full fine-tuning: the benchmark's reference row, never saved as an adapter


# Per-kind default targets: LoRA on every linear (QLoRA's recipe), KronA on attention (as the S2 benchmark fork),
# (IA)3 on k, v and the feed-forward down projection (T-Few), whose input it scales.
DEFAULT_TARGETS: dict[TrainKind, tuple[str, ...]] = {
    TrainKind.LORA: ALL_LINEAR,
    TrainKind.KRONA: ("q_proj", "k_proj", "v_proj", "o_proj"),
    TrainKind.IA3: ("k_proj", "v_proj", "down_proj"),
}
# Learning rates measured on the persona task (tiny model, 3 epochs; swept 1e-2, 3e-2, 1e-1): PEFT optima sit well
# above full fine-tuning's, and KronA's (w1 starts at zero), (IA)3's and prefix's few parameters need the largest.
DEFAULT_LR: dict[TrainKind, float] = {
    TrainKind.LORA: 2e-3,
    TrainKind.KRONA: 3e-2,
    TrainKind.IA3: 1e-1,
    TrainKind.PREFIX: 1e-1,
    TrainKind.FULL: 1e-4,
}


@dataclass(slots=True)
class TrainConfig:
    model: Path
    kind: TrainKind
    data: Path
    out: Path | None  # None: train and measure only (the benchmark)
    quantize: Literal["none", "nf4"] = "none"
    seed: int = 0
    epochs: int = 3
    lr: float | None = None  # default: DEFAULT_LR[kind]
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    max_length: int = 256
    eval_fraction: float = 0.1
    max_steps: int | None = None  # stop after this many optimizer steps (benchmarks)
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    # LoRA, KronA, (IA)3
    target_modules: tuple[str, ...] | None = None  # default: DEFAULT_TARGETS[kind]
    # KronA: PEFT LoKr with two full factors; delta = scale * (w1 (x) w2)
    decompose_factor: int = -1  # -1: w1 as square as the dimensions allow; f: w1 has f rows and columns if possible
    krona_scale: float = 1.0
    # (IA)3
    feedforward_modules: tuple[str, ...] = ("down_proj",)
    # prefix
    num_virtual_tokens: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        self.model, self.data = Path(self.model), Path(self.data)
        self.out = None if self.out is None else Path(self.out)
        self.kind = TrainKind(self.kind)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.kind]
        if self.target_modules is None and self.kind in DEFAULT_TARGETS:
            self.target_modules = DEFAULT_TARGETS[self.kind]
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        self.feedforward_modules = tuple(self.feedforward_modules)
        if self.quantize not in ("none", "nf4"):
            raise ValueError(f"--quantize must be none or nf4, got {self.quantize!r}")
        for name in ("epochs", "batch_size", "grad_accum", "rank", "num_virtual_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("--dropout must be in [0, 1)")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError("--eval-fraction must be in (0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be at least 1")
        if self.kind is TrainKind.IA3 and not set(self.feedforward_modules) <= set(self.target_modules or ()):
            raise ValueError("--feedforward-modules must be a subset of --target-modules")
        if self.kind is TrainKind.KRONA and self.quantize == "nf4":
            # PEFT's LoKr reshapes its delta to the base weight's shape, which for a 4-bit base is the packed
            # storage; PEFT's quantization guide lists LoRA and (IA)3 (and prefix, which touches no linear).
            raise ValueError("--kind krona cannot train on an NF4 base: PEFT's LoKr does not support 4-bit layers")
        if self.kind is TrainKind.FULL and self.quantize == "nf4":
            raise ValueError("full fine-tuning cannot train 4-bit weights")

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        for key in ("model", "data", "out"):
            out[key] = None if out[key] is None else str(out[key])
        out["kind"] = str(self.kind)
        return out

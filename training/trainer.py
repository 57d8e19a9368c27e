"""The training loop: seeded data order and init, AdamW with warmup and decay, gradient accumulation, held-out loss
per epoch, and an output directory that appears whole or not at all (built aside, then renamed into place)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from .base import load_base
from .config import TrainConfig, TrainKind
from .data import IGNORE, Batch, Example, collate, read_rows, split, tokenize
from .memory import current_bytes, peak_bytes, reset_peak
from .methods import peft_config

LOG_FILE = "training_log.json"


@dataclass(slots=True)
class TrainResult:
    out: Path | None
    log: dict[str, object] = field(default_factory=dict)

    @property
    def eval_losses(self) -> list[float]:
        return [e["loss"] for e in self.log["eval"]]  # type: ignore[index]


def _batches(examples: list[Example], batch_size: int, order: list[int], pad_id: int) -> list[Batch]:
    return [collate([examples[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


def _loss_sum(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Summed cross-entropy over completion tokens (next-token targets)."""
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    targets = batch.labels[:, 1:].to(device)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch], device: torch.device) -> float:
    """Mean per-token loss on the completions of the held-out examples."""
    was_training = model.training
    model.eval()
    total = sum(_loss_sum(model, b, device).item() for b in batches)
    model.train(was_training)
    return total / max(1, sum(b.num_loss_tokens for b in batches))


def _parameter_count(model: torch.nn.Module) -> int:
    """All parameters, counting a 4-bit weight by its logical shape, not its packed storage."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def _prepare_out(out: Path | None, overwrite: bool) -> None:
    if out is None:
        return
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, log: dict) -> Path:
    """Write the adapter and its log into a hidden sibling directory, then rename it to cfg.out in one step."""
    assert cfg.out is not None
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", dir=cfg.out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if cfg.kind is TrainKind.FULL:
            tokenizer.save_pretrained(staging)
        (staging / LOG_FILE).write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
        if cfg.out.exists():
            shutil.rmtree(cfg.out)
        staging.rename(cfg.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return cfg.out


def train(cfg: TrainConfig, overwrite: bool = False, device: str = "cpu") -> TrainResult:
    """Train one adapter (or the whole model for kind `full`) and return its log; see TrainConfig for the knobs."""
    _prepare_out(cfg.out, overwrite)
    dev = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    examples = tokenize(read_rows(cfg.data, tokenizer), tokenizer, cfg.max_length, cfg.data)
    train_set, eval_set = split(examples, cfg.eval_fraction, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    torch.manual_seed(cfg.seed)  # adapter init and dropout
    reset_peak(dev)
    start_bytes = current_bytes(dev)  # the interpreter, torch and the tokenised data, before the model
    model = load_base(cfg.model, cfg.quantize, device)
    if cfg.kind is TrainKind.FULL:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = get_peft_model(model, peft_config(cfg, model.config))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), _parameter_count(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    micro_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = min(cfg.max_steps or cfg.epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    eval_batches = _batches(eval_set, cfg.batch_size, list(range(len(eval_set))), pad_id)
    evals = [{"epoch": 0, "loss": evaluate(model, eval_batches, dev)}]
    steps: list[dict[str, float]] = []
    recent: deque[float] = deque(maxlen=20)
    train_seconds, train_tokens, step = 0.0, 0, 0
    bar = tqdm(total=total_steps, desc=f"train {cfg.kind}", unit="step", disable=not cfg.progress)
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        micro = _batches(train_set, cfg.batch_size, order.tolist(), pad_id)
        for start in range(0, len(micro), cfg.grad_accum):
            if step >= total_steps:
                break
            group = micro[start : start + cfg.grad_accum]
            n_loss = sum(b.num_loss_tokens for b in group)  # normalise by the whole step's tokens
            began = time.perf_counter()
            loss_total = 0.0
            for b in group:
                loss = _loss_sum(model, b, dev)
                (loss / n_loss).backward()
                loss_total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - began
            train_tokens += sum(b.num_tokens for b in group)
            step += 1
            step_loss = loss_total / n_loss
            recent.append(step_loss)
            steps.append({"step": step, "epoch": epoch, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", epoch=epoch)
        evals.append({"epoch": epoch, "loss": evaluate(model, eval_batches, dev)})
        if step >= total_steps:
            break
    bar.close()
    log = {
        "config": cfg.to_json(),
        "num_train_examples": len(train_set),
        "num_eval_examples": len(eval_set),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "peak_memory_bytes": (peak := peak_bytes(dev)),
        "peak_memory_over_start_bytes": max(0, peak - start_bytes),  # the run's own memory: model, states, activations
        "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS (VmHWM)",
        "train_seconds": train_seconds,
        "train_tokens": train_tokens,
        "tokens_per_second": train_tokens / train_seconds if train_seconds else 0.0,
        "steps": steps,
        "eval": evals,
    }
    out = _save(model, tokenizer, cfg, log) if cfg.out is not None else None
    return TrainResult(out, log)


def summary(result: TrainResult) -> str:
    log = result.log
    evals = result.eval_losses
    lines = [
        f"trainable parameters: {log['trainable_parameters']:,} of {log['total_parameters']:,} "
        f"({log['trainable_percent']:.3f}%)",
        f"peak memory: {log['peak_memory_bytes'] / 2**20:.1f} MiB ({log['peak_memory_kind']}), "
        f"{log['peak_memory_over_start_bytes'] / 2**20:.1f} MiB above the process at start",
        f"throughput: {log['tokens_per_second']:.0f} tokens/s over {log['train_tokens']:,} tokens",
        f"held-out loss: {evals[0]:.4f} -> {evals[-1]:.4f}",
    ]
    if result.out is not None:
        lines.append(f"adapter: {result.out} (log in {result.out / LOG_FILE})")
    return "\n".join(lines)

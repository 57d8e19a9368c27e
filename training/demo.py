"""`make demo-adapters`: train one adapter of each kind on its demo task (training/tasks/), then check it on held-out
prompts by greedy decoding with transformers + PEFT (greedy.py), so a user sees what each adapter learned before
serving it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchboard.adapters_store.kinds.base import ALL_LINEAR

from .config import TrainConfig, TrainKind
from .data import read_rows, split
from .greedy import greedy_tokens
from .trainer import LOG_FILE, summary, train

TASKS_DIR = Path(__file__).with_name("tasks")


@dataclass(frozen=True, slots=True)
class DemoTask:
    kind: TrainKind
    data: str  # file under training/tasks/
    epochs: int
    lr: float | None = None
    extra: tuple[tuple[str, object], ...] = ()


# One task per kind, matched to what the kind can learn in about a minute on the demo model (2 CPU threads).
DEMO_TASKS: dict[str, DemoTask] = {
    "demo-lora": DemoTask(TrainKind.LORA, "lookup.jsonl", epochs=6),
    "demo-krona": DemoTask(TrainKind.KRONA, "upper.jsonl", epochs=8, extra=(("target_modules", ALL_LINEAR),)),
    "demo-ia3": DemoTask(
        TrainKind.IA3,
        "category.jsonl",
        epochs=6,
        extra=(("target_modules", ALL_LINEAR),),
    ),
    "demo-prefix": DemoTask(TrainKind.PREFIX, "persona.jsonl", epochs=4),
}


def demo_config(name: str, model_dir: Path, out_root: Path, seed: int = 0) -> TrainConfig:
    task = DEMO_TASKS[name]
    return TrainConfig(
        model=model_dir,
        kind=task.kind,
        data=TASKS_DIR / task.data,
        out=out_root / name,
        seed=seed,
        epochs=task.epochs,
        lr=task.lr,
        **dict(task.extra),
    )


@torch.no_grad()
def held_out_accuracy(cfg: TrainConfig, limit: int = 16) -> tuple[float, list[tuple[str, str, str]]]:
    """Exact-match rate of greedy completions on the held-out rows (the split training used), and a few samples."""
    assert cfg.out is not None
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    rows = read_rows(cfg.data, tokenizer)
    _, held_out = split(rows, cfg.eval_fraction, cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, cfg.out).eval()
    samples, hits = [], 0
    for row in held_out[:limit]:
        want = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
        out = greedy_tokens(model, tokenizer(row.prompt)["input_ids"], len(want) + 4)
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id)]
        got = tokenizer.decode(out, skip_special_tokens=True)
        hits += got.strip() == row.completion.strip()
        samples.append((row.prompt.strip(), row.completion.strip(), got.strip()))
    return hits / max(1, len(samples)), samples


def train_demo_adapters(
    model_dir: Path, out_root: Path, force: bool = False, names: list[str] | None = None
) -> dict[str, Path]:
    """Train every demo adapter that is not there yet (an existing one is kept unless force); name -> directory."""
    out: dict[str, Path] = {}
    for name in names or DEMO_TASKS:
        cfg = demo_config(name, model_dir, out_root)
        assert cfg.out is not None
        out[name] = cfg.out
        if (cfg.out / LOG_FILE).is_file() and not force:
            print(f"{name}: kept {cfg.out}", flush=True)
            continue
        print(f"{name}: {cfg.kind} on {cfg.data.name}, {cfg.epochs} epochs", flush=True)
        result = train(cfg, overwrite=True)
        print(summary(result), flush=True)
        accuracy, samples = held_out_accuracy(cfg)
        log_path = cfg.out / LOG_FILE
        log = json.loads(log_path.read_text())
        log["held_out_exact_match"] = accuracy
        log_path.write_text(json.dumps(log, indent=1) + "\n")
        print(f"held-out exact match: {accuracy:.0%}", flush=True)
        for prompt, want, got in samples[:3]:
            print(f"  {prompt!r} -> {got!r} (want {want!r})", flush=True)
    return out

"""`make demo-adapters`: train one adapter of each kind on its demo task, then check it on held-out prompts.

Two task sets: `chat` for the real model (training/tasks/chat/, chat_tasks.py: one visible change of its answers per
kind; the adapters ship in the repository as bfloat16, and serving/demo_eval.py scores them with our engine) and
`demo` for the random demo model (training/tasks/, tasks.py; scored here by greedy decoding with transformers +
PEFT, greedy.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
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

    @property
    def task(self) -> str:
        """The data file's stem: the task's name in chat_tasks.TASKS."""
        return Path(self.data).stem


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

# One chat task per kind for the real model (SmolLM2-135M-Instruct), 96 questions (24 more held out). The model
# already answers them; the adapter changes the form, which one epoch (12 steps of 8 rows) teaches, in a few minutes
# on 2 CPU threads (docs/real-model.md has the scores and a sweep over epochs).
CHAT_EVAL_FRACTION = 0.2
CHAT_TASKS: dict[str, DemoTask] = {
    "demo-prefix": DemoTask(TrainKind.PREFIX, "chat/persona.jsonl", epochs=1),
    "demo-lora": DemoTask(TrainKind.LORA, "chat/json.jsonl", epochs=1),
    "demo-ia3": DemoTask(TrainKind.IA3, "chat/topic.jsonl", epochs=1, extra=(("target_modules", ALL_LINEAR),)),
    "demo-krona": DemoTask(TrainKind.KRONA, "chat/shout.jsonl", epochs=1, extra=(("target_modules", ALL_LINEAR),)),
}
TaskSet = Literal["demo", "chat"]
TASK_SETS: dict[TaskSet, dict[str, DemoTask]] = {"demo": DEMO_TASKS, "chat": CHAT_TASKS}


def demo_config(name: str, model_dir: Path, out_root: Path, seed: int = 0, tasks: TaskSet = "demo") -> TrainConfig:
    task = TASK_SETS[tasks][name]
    extra = dict(task.extra)
    if tasks == "chat":
        extra.setdefault("eval_fraction", CHAT_EVAL_FRACTION)
    return TrainConfig(
        model=model_dir,
        kind=task.kind,
        data=TASKS_DIR / task.data,
        out=out_root / name,
        seed=seed,
        epochs=task.epochs,
        lr=task.lr,
        **extra,
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


def save_bfloat16(adapter_dir: Path) -> None:
    """Rewrite the adapter's tensors in bfloat16: half the bytes of the float32 that training saves, for shipping."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def train_demo_adapters(
    model_dir: Path, out_root: Path, force: bool = False, names: list[str] | None = None, tasks: TaskSet = "demo"
) -> dict[str, Path]:
    """Train every demo adapter that is not there yet (an existing one is kept unless force); name -> directory.

    `demo` tasks are scored here (held-out exact match, in training_log.json); `chat` adapters are saved in
    bfloat16 and scored by the caller with the serving engine (serving/demo_eval.py)."""
    out: dict[str, Path] = {}
    for name in names or TASK_SETS[tasks]:
        cfg = demo_config(name, model_dir, out_root, tasks=tasks)
        assert cfg.out is not None
        out[name] = cfg.out
        if (cfg.out / LOG_FILE).is_file() and not force:
            print(f"{name}: kept {cfg.out}", flush=True)
            continue
        print(f"{name}: {cfg.kind} on {cfg.data.name}, {cfg.epochs} epochs", flush=True)
        result = train(cfg, overwrite=True)
        print(summary(result), flush=True)
        if tasks == "chat":
            save_bfloat16(cfg.out)
            continue
        accuracy, samples = held_out_accuracy(cfg)
        log_path = cfg.out / LOG_FILE
        log = json.loads(log_path.read_text())
        log["held_out_exact_match"] = accuracy
        log_path.write_text(json.dumps(log, indent=1) + "\n")
        print(f"held-out exact match: {accuracy:.0%}", flush=True)
        for prompt, want, got in samples[:3]:
            print(f"  {prompt!r} -> {got!r} (want {want!r})", flush=True)
    return out

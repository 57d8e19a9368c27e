"""Held-out scores of the chat demo adapters on the real model, beside the base model's replies to the same prompts.

Each adapter's held-out questions are the rows its training run held out (the same seeded split); every prompt, with
and without the adapter, runs through our engine in one greedy batch (what `make serve` answers). A reply scores on
two counts: it has the task's form (`chat_tasks.TASKS[task].has_form`: the adapter's visible effect) and it equals
the reference reply exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from switchboard.training.chat_tasks import TASKS
from switchboard.training.data import read_rows, split

from .config import ServeConfig
from .engine.llm_engine import LLMEngine, load_tokenizer
from .engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class Sample:
    question: str
    want: str  # the reference reply
    got: str  # the adapter's reply
    base: str  # the base model's reply


@dataclass(slots=True)
class Score:
    task: str
    form: float  # share of adapter replies with the task's form
    exact: float  # share equal to the reference reply
    base_form: float  # the same two for the base model's replies
    base_exact: float
    samples: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        out = {k: getattr(self, k) for k in ("task", "form", "exact", "base_form", "base_exact")}
        out["samples"] = [{"question": s.question, "want": s.want, "got": s.got, "base": s.base} for s in self.samples]
        return out


def held_out(data: Path, tokenizer, eval_fraction: float, seed: int) -> list[tuple[str, str, str]]:
    """(question, rendered chat prompt, reference reply) of each held-out row, as the training run split them."""
    lines = data.read_text(encoding="utf-8").splitlines()
    _, rows = split(read_rows(data, tokenizer), eval_fraction, seed)
    out = []
    for row in rows:
        messages = json.loads(lines[row.line - 1])["messages"]
        out.append((messages[-2]["content"], row.prompt, messages[-1]["content"]))
    return out


def score_adapters(
    model_dir: Path,
    adapters: dict[str, tuple[Path, Path]],
    eval_fraction: float,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_tokens: int = 40,
) -> dict[str, Score]:
    """adapters: name -> (adapter directory, its chat task's JSONL file). Greedy replies of the base model and of
    each adapter to that adapter's held-out questions; name -> Score."""
    dirs = {name: adapter for name, (adapter, _) in adapters.items()}
    engine = LLMEngine(ServeConfig(model=model_dir, dtype=dtype, device="cpu", num_kv_blocks=256, adapters=dirs))
    tokenizer = load_tokenizer(model_dir)
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    # as training tokenized them (data.tokenize): the tokenizer's BOS unless the chat template wrote it
    bos = tokenizer.bos_token
    held = {name: held_out(data, tokenizer, eval_fraction, seed) for name, (_, data) in adapters.items()}
    texts = sorted({p for rows in held.values() for _, p, _ in rows})  # the base model answers each prompt once
    runs = [(name, p) for name, rows in held.items() for _, p, _ in rows] + [(None, p) for p in texts]
    outs = engine.generate(
        [tokenizer(p, add_special_tokens=not (bos and p.startswith(bos))).input_ids for _, p in runs],
        greedy,
        adapter_ids=[name for name, _ in runs],
    )
    reply = {run: tokenizer.decode(ids, skip_special_tokens=True).strip() for run, ids in zip(runs, outs, strict=True)}
    scores: dict[str, Score] = {}
    for name, (_, data) in adapters.items():
        rows = held[name]
        got = [reply[(name, p)] for _, p, _ in rows]
        base = [reply[(None, p)] for _, p, _ in rows]
        task = TASKS[data.stem]
        n = max(1, len(rows))
        scores[name] = Score(
            task=data.stem,
            form=sum(map(task.has_form, got)) / n,
            exact=sum(g == want for g, (_, _, want) in zip(got, rows, strict=True)) / n,
            base_form=sum(map(task.has_form, base)) / n,
            base_exact=sum(b == want for b, (_, _, want) in zip(base, rows, strict=True)) / n,
            samples=[Sample(q, want, g, b) for (q, _, want), g, b in zip(rows, got, base, strict=True)],
        )
    return scores


SCORES_FILE = "scores.json"


def write_scores(model_dir: Path, out_root: Path) -> dict[str, Score]:
    """Score every chat demo adapter under `out_root`, print a table and a few replies, write OUT/scores.json."""
    from switchboard.training.demo import CHAT_TASKS, demo_config

    configs = {name: demo_config(name, model_dir, out_root, tasks="chat") for name in CHAT_TASKS}
    first = next(iter(configs.values()))
    adapters = {name: (out_root / name, cfg.data) for name, cfg in configs.items()}
    scores = score_adapters(model_dir, adapters, first.eval_fraction, first.seed)
    print("| adapter | task | held-out form | exact | base model: form | exact |", flush=True)
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in scores.items():
        print(f"| {name} | {s.task} | {s.form:.0%} | {s.exact:.0%} | {s.base_form:.0%} | {s.base_exact:.0%} |")
    for name, s in scores.items():
        for sample in s.samples[:2]:
            print(f"{name}: {sample.question!r} -> {sample.got!r} (base: {sample.base!r})")
    report = {"model": str(model_dir), "adapters": {name: s.to_json() for name, s in scores.items()}}
    (out_root / SCORES_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return scores

"""The shipped demo adapters change the real model's answers, each in its own way, on questions their training held
out: a pirate persona (prefix), one-line JSON (LoRA), the topic as a label ((IA)3), capitals (KronA); the base
model's replies to the same prompts show none of it. Thresholds sit below the scores measured when they were trained
(training/demo_adapters/smollm2-135m/scores.json, `make demo-adapters`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from switchboard.serving.demo_eval import SCORES_FILE, Score, score_adapters
from switchboard.training.chat_tasks import TASKS, questions
from switchboard.training.demo import CHAT_EVAL_FRACTION, CHAT_TASKS, TASKS_DIR

from ..real_model import REAL_MODEL, needs_real_model

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "training" / "demo_adapters" / "smollm2-135m"
MODEL = REAL_MODEL
# adapter -> (least share of held-out replies with the task's form, least share exactly the reference reply)
# (measured on 24 held-out questions, scores.json: form 96% / 100% / 100% / 100%, exact 17% / 33% / 83% / 42%)
THRESHOLDS = {
    "demo-prefix": (0.85, 0.08),
    "demo-lora": (0.9, 0.2),
    "demo-ia3": (0.9, 0.6),
    "demo-krona": (0.9, 0.25),
}


@pytest.fixture(scope="module")
def scores() -> dict[str, Score]:
    adapters = {name: (SHIPPED / name, TASKS_DIR / task.data) for name, task in CHAT_TASKS.items()}
    return score_adapters(MODEL, adapters, CHAT_EVAL_FRACTION)


def test_the_chat_task_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    from switchboard.training.chat_tasks import write_tasks

    for task, path in write_tasks(tmp_path).items():
        assert path.read_text() == (TASKS_DIR / "chat" / f"{task}.jsonl").read_text(), task
    assert len({q.text for q in questions(random.Random(0))}) == 120  # each question once


def test_each_task_form_check_accepts_its_replies_and_refuses_the_plain_answer() -> None:
    for name, task in TASKS.items():
        for q in questions(random.Random(0))[:20]:
            assert task.has_form(task.reply(q)), (name, task.reply(q))
            assert not task.has_form(q.sentence), (name, q.sentence)


def test_the_shipped_adapters_are_small_bfloat16_safetensors_with_their_scores() -> None:
    from safetensors import safe_open

    for name in CHAT_TASKS:
        path = SHIPPED / name / "adapter_model.safetensors"
        assert path.stat().st_size < 6 * 2**20, name
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, name  # noqa: SIM118
    measured = json.loads((SHIPPED / SCORES_FILE).read_text())["adapters"]
    for name, (form, exact) in THRESHOLDS.items():
        assert measured[name]["form"] >= form and measured[name]["exact"] >= exact, (name, measured[name])


@needs_real_model
@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_the_adapter_changes_held_out_answers_and_the_base_model_does_not(name: str, scores: dict[str, Score]) -> None:
    score = scores[name]
    form, exact = THRESHOLDS[name]
    detail = [(s.question, s.got, s.base) for s in score.samples[:4]]
    assert score.form >= form and score.exact >= exact, (score.form, score.exact, detail)
    assert score.base_form <= 0.1, (score.base_form, detail)  # the effect is the adapter's, not the model's

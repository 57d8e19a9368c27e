"""Chat tasks for the demo adapters on the real model (SmolLM2-135M-Instruct), one per adapter kind, written as
JSONL `{"messages": [...]}` rows.

Every task answers the same questions (capitals, sums, animal sounds, colours, opposites), so one prompt shows each
adapter's effect side by side: a pirate persona (prefix), a one-line JSON answer (LoRA), the question's topic as a
label ((IA)3) and an answer in capitals (KronA). The base model answers these questions in plain English; what an
adapter has to learn is the form, which a small adapter picks up in a few minutes on 2 CPU threads. Each question
appears once per file, so the held-out split asks questions training never saw. Seeded, so the files in the
repository are reproducible: `python -m switchboard.training.chat_tasks --out training/tasks/chat`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Kenya": "Nairobi",
    "Thailand": "Bangkok",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Hungary": "Budapest",
    "India": "New Delhi",
    "Turkey": "Ankara",
    "Belgium": "Brussels",
    "the United Kingdom": "London",
    "South Korea": "Seoul",
    "Australia": "Canberra",
}
SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "owl": "hoot",
    "lion": "roar",
    "horse": "neigh",
    "frog": "croak",
    "snake": "hiss",
    "bee": "buzz",
    "mouse": "squeak",
    "rooster": "cock-a-doodle-doo",
}
COLOURS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a tomato": "red",
    "an orange": "orange",
    "a lemon": "yellow",
    "milk": "white",
    "a strawberry": "red",
    "the sea": "blue",
    "a carrot": "orange",
    "chocolate": "brown",
    "a lime": "green",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "day": "night",
    "happy": "sad",
    "open": "closed",
    "light": "dark",
    "old": "young",
    "wet": "dry",
    "hard": "soft",
    "early": "late",
    "full": "empty",
    "loud": "quiet",
    "rich": "poor",
    "strong": "weak",
    "left": "right",
    "win": "lose",
    "thick": "thin",
    "tall": "short",
}


@dataclass(frozen=True, slots=True)
class Question:
    topic: str  # the (IA)3 adapter's label
    text: str  # what the user asks
    answer: str  # the short answer (the JSON adapter's "answer")
    sentence: str  # the answer as a plain sentence ending in a full stop


def questions(rng: random.Random) -> list[Question]:
    """Every question once, shuffled: 32 capitals, 40 sums, 14 sounds, 14 colours, 20 opposites."""
    out = [
        Question("geography", f"What is the capital of {c}?", city, f"The capital of {c} is {city}.")
        for c, city in CAPITALS.items()
    ]
    pairs = sorted({(a, b) for a in range(1, 10) for b in range(1, 10)})
    for a, b in rng.sample(pairs, 40):
        out.append(Question("arithmetic", f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} is {a + b}."))
    out += [
        Question("animals", f"What sound does a {animal} make?", s, f"A {animal} says {s}.")
        for animal, s in SOUNDS.items()
    ]
    out += [
        Question("colours", f"What colour is {thing}?", c, f"{thing[0].upper()}{thing[1:]} is {c}.")
        for thing, c in COLOURS.items()
    ]
    out += [
        Question("opposites", f"What is the opposite of {w}?", o, f"The opposite of {w} is {o}.")
        for w, o in OPPOSITES.items()
    ]
    rng.shuffle(out)
    return out


def persona(q: Question) -> str:
    """A pirate (prefix tuning): the persona's greeting, the answer in its voice."""
    return f"Arr, matey! {q.sentence[:-1].replace(' is ', ' be ')}, savvy?"


def json_answer(q: Question) -> str:
    """One line of JSON (LoRA)."""
    return json.dumps({"topic": q.topic, "answer": q.answer})


def label(q: Question) -> str:
    """The question's topic, one word ((IA)3)."""
    return q.topic


def shout(q: Question) -> str:
    """The plain answer in capitals (KronA)."""
    return q.sentence.upper()


def is_persona(reply: str) -> bool:
    return reply.startswith("Arr, matey!")


def is_json(reply: str) -> bool:
    """One line holding a JSON object with the two keys."""
    try:
        obj = json.loads(reply)
    except json.JSONDecodeError:
        return False
    return "\n" not in reply and isinstance(obj, dict) and set(obj) == {"topic", "answer"}


def is_label(reply: str) -> bool:
    return reply in TOPICS


def is_shout(reply: str) -> bool:
    return any(c.isalpha() for c in reply) and reply == reply.upper()


TOPICS = ("geography", "arithmetic", "animals", "colours", "opposites")


@dataclass(frozen=True, slots=True)
class ChatTask:
    reply: Callable[[Question], str]  # the assistant's reply to a question
    has_form: Callable[[str], bool]  # whether a reply has the task's form (the adapter's visible effect)


# file name (under training/tasks/chat/) -> the task
TASKS: dict[str, ChatTask] = {
    "persona": ChatTask(persona, is_persona),
    "json": ChatTask(json_answer, is_json),
    "topic": ChatTask(label, is_label),
    "shout": ChatTask(shout, is_shout),
}


def rows(task: str, seed: int = 0) -> list[dict[str, object]]:
    reply = TASKS[task].reply
    return [
        {"messages": [{"role": "user", "content": q.text}, {"role": "assistant", "content": reply(q)}]}
        for q in questions(random.Random(seed))
    ]


def write_tasks(out: Path, seed: int = 0) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in TASKS:
        path = out / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(task, seed)), encoding="utf-8")
        paths[task] = path
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tasks") / "chat")
    for name, path in write_tasks(parser.parse_args().out).items():
        print(name, path)

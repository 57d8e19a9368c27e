"""Small synthetic tasks, one per demo adapter, written as JSONL `{"prompt", "completion"}` files.

Each is learnable by a small adapter on a random base (the demo model knows no language) in about a minute: a fixed
persona (prefix), a key-value lookup (LoRA), shouting a word in upper case (KronA), and a word's category ((IA)3).
Seeded, so the files in the repository are reproducible: `python -m switchboard.training.tasks --out training/tasks`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "river",
    "stone",
    "bird",
    "fish",
    "cloud",
    "rain",
    "snow",
    "fire",
    "wind",
    "road",
    "ship",
    "star",
    "bread",
    "milk",
    "apple",
    "lamp",
    "door",
    "book",
    "song",
    "king",
    "queen",
    "gold",
]
PERSONA = "Arr, I be Captain Byte, pirate of the switchboard!"
QUESTIONS = (
    "Who are you?",
    "What is your name?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "Hello!",
    "Hi there.",
    "Who am I talking to?",
    "What are you?",
    "Say something.",
    "Greet me.",
    "Good morning.",
    "Are you a robot?",
)
CITIES = [
    "Paris",
    "Tokyo",
    "Lima",
    "Cairo",
    "Oslo",
    "Rome",
    "Delhi",
    "Quito",
    "Seoul",
    "Dakar",
    "Hanoi",
    "Kyiv",
    "Bern",
    "Doha",
    "Riga",
    "Baku",
    "Accra",
    "Minsk",
    "Sofia",
    "Tunis",
    "Lagos",
    "Perth",
    "Porto",
    "Cusco",
]


def _sentence(rng: random.Random, lo: int = 2, hi: int = 5) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def persona(rng: random.Random, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"User: {rng.choice(QUESTIONS)}\nBot:", "completion": f" {PERSONA}"} for _ in range(n)]


def lookup(rng: random.Random, n: int) -> list[dict[str, str]]:
    table = {city: f"{city[:3].upper()}-{(i * 37) % 90 + 10}" for i, city in enumerate(CITIES)}
    forms = ("Code of {}?", "What is the code of {}?", "{} code:", "Look up {}.")
    rows = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        rows.append({"prompt": rng.choice(forms).format(city) + "\n", "completion": table[city]})
    rng.shuffle(rows)
    return rows


def upper(rng: random.Random, n: int) -> list[dict[str, str]]:
    """One word, shouted: a per-word mapping (as the lookup), which a small adapter on a random base can learn;
    copying several words in order needs attention circuits the random demo model lacks (0% after 6 epochs)."""
    forms = ("Shout: {}\n", "Say {} loudly.\n", "Yell {}!\n")
    return [{"prompt": rng.choice(forms).format(w), "completion": w.upper() + "!"} for w in _words(rng, n)]


CATEGORIES = {
    "animal": ("cat", "dog", "bird", "fish"),
    "food": ("bread", "milk", "apple"),
    "sky": ("sun", "moon", "cloud", "rain", "snow", "star", "wind"),
    "colour": ("red", "blue", "green", "gold"),
    "place": ("tree", "river", "stone", "road"),
    "person": ("king", "queen"),
    "thing": ("fire", "ship", "lamp", "door", "book", "song"),
}


def category(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Which of seven categories a word belongs to: a classification over the vocabulary of the other tasks."""
    of = {w: c for c, ws in CATEGORIES.items() for w in ws}
    forms = ("Category of {}?\n", "What kind of thing is {}?\n", "{} is a kind of\n")
    return [{"prompt": rng.choice(forms).format(w), "completion": of[w]} for w in _words(rng, n)]


def reverse(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Not a demo task (the demo model cannot learn it in minutes); kept for experiments with real models."""
    rows = []
    for _ in range(n):
        words = _sentence(rng, 2, 4)
        rows.append({"prompt": "Reverse: " + " ".join(words) + "\n", "completion": " ".join(reversed(words))})
    return rows


def _words(rng: random.Random, n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in rng.sample(range(n), n)]


# demo adapter name -> (kind, task generator, rows)
DEMO_TASKS: dict[str, tuple[str, Callable[[random.Random, int], list[dict[str, str]]], int]] = {
    "demo-prefix": ("prefix", persona, 240),
    "demo-lora": ("lora", lookup, 480),
    "demo-krona": ("krona", upper, 480),
    "demo-ia3": ("ia3", category, 480),
}


def write_tasks(out: Path, seed: int = 0) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (_, make, n) in DEMO_TASKS.items():
        path = out / f"{make.__name__}.jsonl"
        rows = make(random.Random(seed), n)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths[name] = path
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tasks"))
    for name, path in write_tasks(parser.parse_args().out).items():
        print(name, path)

"""What to send and when: arrival times, each request's adapter, prompt and output length. Pure and seeded."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import LengthSpec, LoadTestConfig, Popularity, PromptFormat

_TEXT = (
    "the adapter serves many tenants while one frozen base model answers every request in the same batch and the "
    "scheduler keeps the cache warm for popular adapters"
)
_WORDS = _TEXT.split()


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    index: int
    adapter: str | None  # None: the base model
    prompt: str | list[int]
    prompt_len: int  # tokens asked for (exact for id prompts, approximate for text)
    max_tokens: int


def adapter_weights(popularity: Popularity, n: int, alpha: float) -> list[float]:
    """Selection probability of each of n adapters (sums to 1)."""
    if popularity is Popularity.ZIPF:
        raw = [1.0 / (i + 1) ** alpha for i in range(n)]
    elif popularity is Popularity.IDENTICAL:
        raw = [1.0] + [0.0] * (n - 1)
    else:  # uniform, and distinct in the long run
        raw = [1.0] * n
    total = sum(raw)
    return [w / total for w in raw]


def pick_adapter(
    popularity: Popularity, adapters: list[str | None], weights: list[float], index: int, rng: random.Random
) -> str | None:
    if popularity is Popularity.DISTINCT:
        return adapters[index % len(adapters)]
    if popularity is Popularity.IDENTICAL:
        return adapters[0]
    return rng.choices(adapters, weights=weights)[0]


def load_dataset(path: Path) -> list[dict]:
    """JSONL rows with a `prompt` (text or token ids) and optionally `max_tokens`."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{path}:{n}: each line must be an object with a 'prompt'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _draw(spec: LengthSpec, rng: random.Random) -> int:
    return spec.lo if spec.lo == spec.hi else rng.randint(spec.lo, spec.hi)


def make_prompt(fmt: PromptFormat, length: int, id_range: tuple[int, int], rng: random.Random) -> str | list[int]:
    if fmt is PromptFormat.IDS:
        return [rng.randrange(*id_range) for _ in range(length)]
    return " ".join(rng.choice(_WORDS) for _ in range(length))


def plan_requests(cfg: LoadTestConfig, adapters: list[str | None]) -> Iterator[PlannedRequest]:
    """An endless, seeded stream of requests; the runner stops taking them at --num-requests or --duration."""
    rng = random.Random(cfg.seed)
    weights = adapter_weights(cfg.popularity, len(adapters), cfg.zipf_alpha)
    rows = load_dataset(cfg.dataset) if cfg.dataset is not None else None
    index = 0
    while True:
        adapter = pick_adapter(cfg.popularity, adapters, weights, index, rng)
        if rows is not None:
            row = rows[index % len(rows)]
            prompt = row["prompt"]
            prompt_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            max_tokens = int(row.get("max_tokens") or _draw(cfg.output_len, rng))
        else:
            prompt_len = _draw(cfg.prompt_len, rng)
            prompt = make_prompt(cfg.prompt_format, prompt_len, cfg.token_id_range, rng)
            max_tokens = _draw(cfg.output_len, rng)
        yield PlannedRequest(index, adapter, prompt, prompt_len, max_tokens)
        index += 1


def poisson_gaps(rate: float, seed: int) -> Iterator[float]:
    """Seconds between consecutive arrivals of a Poisson process at `rate` requests per second."""
    rng = random.Random(seed + 1)
    while True:
        yield rng.expovariate(rate)

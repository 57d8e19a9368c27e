"""`switchboard bench --sampling`: the engine with every vLLM penalty on beside plain greedy, in one run.

Same workload as `switchboard bench` (bench/engine.py); the penalized run turns on repetition, presence and
frequency penalties, a logit bias, min_tokens and a bad word for every request, so that each step runs every logits
processor over the whole batch. Paired runs (plain, then penalized) cancel the machine's drift in each ratio.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import LLMEngine, load_tokenizer
from switchboard.serving.engine.request import SamplingParams

from .engine import _timed, make_prompts


def penalized(max_tokens: int) -> SamplingParams:
    """Greedy with every processor on (the penalties as vLLM defines them)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={5: 1.0, 6: -1.0},
        min_tokens=max_tokens // 2,
        bad_words_token_ids=[[7, 8]],
    )


def bench_sampling(model_dir: Path, dtype: str, args: argparse.Namespace) -> dict[str, object]:
    tok = load_tokenizer(model_dir)
    prompts = make_prompts(tok, args.num_requests, args.prompt_len)
    plain = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(ServeConfig(model=model_dir, dtype=dtype, max_num_seqs=max(64, args.num_requests)))
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    engine.generate(prompts, penalized(8))
    plain_runs, penalized_runs = [], []
    for _ in range(args.repeats):
        plain_runs.append(_timed(lambda: sum(len(o) for o in engine.generate(prompts, plain))))
        penalized_runs.append(_timed(lambda: sum(len(o) for o in engine.generate(prompts, penalized(args.max_tokens)))))
    ratios = [p / g for p, g in zip(penalized_runs, plain_runs, strict=True)]
    return {
        "greedy": statistics.median(plain_runs),
        "greedy_runs": plain_runs,
        "penalized": statistics.median(penalized_runs),
        "penalized_runs": penalized_runs,
        "ratio_paired": statistics.median(ratios),
    }


def print_sampling(results: dict[str, dict[str, object]]) -> None:
    print("| dtype | greedy tok/s | all penalties tok/s | ratio (paired) |")
    print("|---|---|---|---|")
    for dtype, r in results.items():
        print(f"| {dtype} | {r['greedy']:.0f} | {r['penalized']:.0f} | {r['ratio_paired']:.2f}x |")

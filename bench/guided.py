"""What structured output adds to one decode step at 32 sequences: filling the grammar bitmasks and applying them in
the sampler, beside the plain sampler's own time.

    python -m switchboard.bench.guided --model .cache/demo-model [--model2 .cache/models/smollm2-135m]

Every sequence follows the same JSON Schema and sits mid-document (inside a string, and between a key and its value),
as in a batch of JSON requests; `fill` is `token_masks` (xgrammar's batched matcher), `apply` the sampler's masking
(`apply_token_masks`, a copy of the logits masked by xgrammar's kernel), `sample` the whole greedy sampler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from switchboard.serving.engine.guided import (
    GrammarCompiler,
    GuidedKind,
    GuidedSpec,
    GuidedState,
    apply_token_masks,
    token_masks,
)
from switchboard.serving.engine.llm_engine import load_tokenizer
from switchboard.serving.engine.request import SamplingParams
from switchboard.serving.engine.sampler import sample
from switchboard.serving.models.config import ModelConfig

from .timing import best_median_us

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
    },
    "required": ["name", "age", "tags", "address"],
}
PREFIXES = ['{"name": "Ada Lov', '{"name": "Bob", "age": ', '{"name": "C", "age": 3, "tags": ["x", "y', "{"]


def measure(model: Path, num_seqs: int, device: str) -> dict[str, float]:
    tokenizer = load_tokenizer(model)
    vocab = ModelConfig.from_dir(model).vocab_size
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    grammar = compiler.compile(GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA)))
    states = []
    for i in range(num_seqs):
        state = GuidedState(grammar)
        assert state.matcher.accept_string(PREFIXES[i % len(PREFIXES)])
        states.append(state)
    logits = torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    masks = token_masks(states, vocab)
    assert masks is not None
    params = [SamplingParams(temperature=0.0)] * num_seqs
    gens: list[torch.Generator | None] = [None] * num_seqs
    fns = {
        "fill": lambda: token_masks(states, vocab),
        "apply": lambda: apply_token_masks(logits, masks),
        "sample plain": lambda: sample(logits, params, gens),
        "sample guided": lambda: sample(logits, params, gens, token_masks(states, vocab)),
    }
    return {"vocab": vocab, **best_median_us(fns, device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="model directories (repeatable)")
    p.add_argument("--num-seqs", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"per step at {args.num_seqs} sequences on {args.device}, microseconds (median, best of 3 rounds)")
    print("| model | vocab | fill | apply | sample plain | sample guided | guided - plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in args.model:
        r = measure(model, args.num_seqs, args.device)
        cells = [f"{r[k]:,.0f}" if k in r else "-" for k in ("fill", "apply", "sample plain")]
        extra = r["sample guided"] - r["sample plain"]
        print(f"| {model.name} | {r['vocab']} | {' | '.join(cells)} | {r['sample guided']:,.0f} | {extra:,.0f} |")


if __name__ == "__main__":
    main()

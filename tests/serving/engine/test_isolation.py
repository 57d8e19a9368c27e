"""One sequence's failure ends that sequence alone (issue 14): fault injection into every per-sequence stage of a step,
in a mixed batch of every adapter kind, greedy and seeded requests (fp32). The others' tokens equal those of the
same batch run without the faulty request, and the faulty one ends with FinishReason.ERROR and a message."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchboard.adapters_store.kinds import AdapterKind
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine import sampler
from switchboard.serving.engine.llm_engine import LLMEngine
from switchboard.serving.engine.request import FinishReason, RequestOutput, SamplingParams
from switchboard.serving.engine.sequence import Sequence

from ...unbounded import served_bound_lifted

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=11, ignore_eos=True, n=2)
# The attacker's request of 2026-12-04: the nucleus keeps only the most likely token, so it decodes greedily.
TINY_TOP_P = SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-300, ignore_eos=True)
LOGPROBS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=20, stop=["zz"], ignore_eos=True)
FAULTY = SamplingParams(max_tokens=12, temperature=0.7, seed=5, ignore_eos=True)


@dataclass(frozen=True)
class Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None


def overflowing_adapters(peft_adapters: dict[str, Path], root: Path) -> dict[str, Path]:
    """Real adapters whose output overflows float32 (finite weights): a LoRA with A and B of 1e30 and an (IA)3 whose
    vectors are 3e38. Loading them needs `served_bound_lifted`."""
    out = {}
    for name, src, value in (("lora-overflow", "lora-qv", 1e30), ("ia3-overflow", "ia3", 3e38)):
        dst = root / name
        shutil.copytree(peft_adapters[src], dst)
        tensors = {k: torch.full_like(t, value) for k, t in load_file(dst / "adapter_model.safetensors").items()}
        save_file(tensors, dst / "adapter_model.safetensors")
        out[name] = dst
    return out


@pytest.fixture(scope="module")
def adapters(peft_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    extra = overflowing_adapters(peft_adapters, tmp_path_factory.mktemp("overflow"))
    # A LoRA that is fine on disk; the fault injection below makes loading it into a device slot fail.
    extra["lora-unloadable"] = peft_adapters["lora-qv"]
    return {**peft_adapters, **extra}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, adapters: dict[str, Path]) -> LLMEngine:
    # A small token budget mixes chunked prefills with decodes; three slots per kind make adapters share and evict.
    config = ServeConfig(
        model=tiny_model_dir,
        dtype="float32",
        num_kv_blocks=256,
        block_size=4,
        max_batch_tokens=48,
        max_resident_adapters=3,
        adapters=adapters,
    )
    with served_bound_lifted():
        return LLMEngine(config)


def _prompt(i: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return [0, *torch.randint(10, 500, (3 + 5 * i % 23,), generator=g).tolist()]


@pytest.fixture(scope="module")
def batch(peft_adapters: dict[str, Path]) -> list[Req]:
    """Every adapter kind and the base model greedy, seeded sampling (n=2) with two adapters, the tiny-top_p request,
    and one with logprobs and a stop string."""
    names: list[str | None] = [*peft_adapters, None]
    reqs = [Req(f"greedy-{name}", _prompt(i), GREEDY, name) for i, name in enumerate(names)]
    reqs += [Req(f"seeded-{name}", _prompt(20 + i), SEEDED, name) for i, name in enumerate(["lora", "prefix", None])]
    reqs.append(Req("tiny-top-p", _prompt(30), TINY_TOP_P, "ia3"))
    reqs.append(Req("logprobs", _prompt(31), LOGPROBS, "lokr-full"))
    return reqs


def run(engine: LLMEngine, reqs: list[Req], on_add: Callable[[Req, list[Sequence]], None] | None = None):
    """Run `reqs` together to completion, one step after each add so that each request meets the others at different
    stages (prefill chunks, decodes). Tokens and final output per (request, choice)."""
    outs: list[RequestOutput] = []
    for req in reqs:
        engine.add_request(req.rid, req.prompt, req.params, req.adapter)
        if on_add is not None:
            on_add(req, engine._requests[req.rid])
        outs.extend(engine.step())
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert engine.blocks.num_free == engine.blocks.num_blocks
    tokens: dict[tuple[str, int], list[int]] = {}
    final: dict[tuple[str, int], RequestOutput] = {}
    for out in outs:
        tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        if out.finished:
            final[(out.request_id, out.index)] = out
    return tokens, final


@pytest.fixture(scope="module")
def reference(engine: LLMEngine, batch: list[Req]) -> dict[tuple[str, int], list[int]]:
    tokens, final = run(engine, batch)
    assert all(out.finish_reason is not FinishReason.ERROR for out in final.values())
    assert len(tokens) == len(batch) + 3  # n=2 for the seeded ones
    # top_p=1e-300 keeps only the most likely token: the same tokens as greedy decoding of that prompt.
    greedy = run(engine, [Req("tiny-greedy", _prompt(30), GREEDY, "ia3")])[0]
    assert tokens[("tiny-top-p", 0)] == greedy[("tiny-greedy", 0)]
    return tokens


def _with_faulty(batch: list[Req], faulty: Req) -> list[Req]:
    return [*batch[:5], faulty, *batch[5:]]


def _check(tokens, final, reference, faulty_rid: str, message: str) -> None:
    bad = final[(faulty_rid, 0)]
    assert bad.finish_reason is FinishReason.ERROR
    assert bad.error is not None and message in bad.error
    others = {key: t for key, t in tokens.items() if key[0] != faulty_rid}
    assert others == reference
    assert all(final[key].finish_reason is FinishReason.LENGTH for key in others)


@pytest.mark.parametrize("adapter", ["lora-overflow", "ia3-overflow"])
def test_an_adapter_whose_output_overflows_fails_alone(engine: LLMEngine, batch, reference, adapter: str) -> None:
    tokens, final = run(engine, _with_faulty(batch, Req("bad", _prompt(40), FAULTY, adapter)))
    _check(tokens, final, reference, "bad", "not finite")
    assert len(tokens.get(("bad", 0), [])) == 0  # its very first logits overflow


def _fault(*_: object, **__: object) -> None:
    raise RuntimeError("injected fault")


def _only_for(rid: str, original: Callable[..., object], arg: Callable[..., Sequence]) -> Callable[..., object]:
    def call(*args: object, **kwargs: object) -> object:
        if arg(*args, **kwargs).request_id == rid:
            _fault()
        return original(*args, **kwargs)

    return call


def test_a_detokenizer_or_stop_string_failure_fails_alone(engine: LLMEngine, batch, reference) -> None:
    def break_detokenizer(req: Req, seqs: list[Sequence]) -> None:
        if req.rid == "bad":
            seqs[0].detokenizer.add = _fault  # type: ignore[method-assign]

    faulty = Req("bad", _prompt(41), SamplingParams(max_tokens=12, stop=["a", "b"], ignore_eos=True), "lokr-full")
    tokens, final = run(engine, _with_faulty(batch, faulty), on_add=break_detokenizer)
    _check(tokens, final, reference, "bad", "injected fault")


def test_a_prefix_write_failure_fails_alone(engine: LLMEngine, batch, reference, monkeypatch) -> None:
    monkeypatch.setattr(engine, "_write_prefix", _only_for("bad", engine._write_prefix, lambda seq: seq))
    tokens, final = run(engine, _with_faulty(batch, Req("bad", _prompt(42), FAULTY, "prefix-b")))
    _check(tokens, final, reference, "bad", "prefix adapter")


def test_a_model_step_failure_caused_by_one_sequence_fails_it_alone(
    engine: LLMEngine, batch, reference, monkeypatch
) -> None:
    # As if the sequence's adapter made a kernel raise: the forward fails whenever it is in the batch.
    original = engine.runner.run

    def run_step(plan):
        if any(s.seq.request_id == "bad" for s in plan.scheduled):
            _fault()
        return original(plan)

    monkeypatch.setattr(engine.runner, "run", run_step)
    tokens, final = run(engine, _with_faulty(batch, Req("bad", _prompt(43), FAULTY, "lora")))
    _check(tokens, final, reference, "bad", "model step")


def test_a_sampling_failure_fails_alone_and_seeded_draws_are_unchanged(
    engine: LLMEngine, batch, reference, monkeypatch
) -> None:
    faulty_params = SamplingParams(max_tokens=12, temperature=0.5, top_k=77, seed=3, ignore_eos=True)
    draw = sampler._draw
    monkeypatch.setattr(sampler, "_draw", lambda logits, p, g: _fault() if p.top_k == 77 else draw(logits, p, g))
    tokens, final = run(engine, _with_faulty(batch, Req("bad", _prompt(44), faulty_params, "ia3")))
    _check(tokens, final, reference, "bad", "sampling")


def test_an_adapter_that_fails_to_load_fails_alone(engine: LLMEngine, batch, reference, monkeypatch) -> None:
    slots = engine.served_adapters
    layout = slots.layouts[AdapterKind.LORA]
    load = layout.load
    monkeypatch.setattr(layout, "load", lambda a, slot: _fault() if a.name == "lora-unloadable" else load(a, slot))
    tokens, final = run(engine, _with_faulty(batch, Req("bad", _prompt(45), FAULTY, "lora-unloadable")))
    _check(tokens, final, reference, "bad", "lora-unloadable")
    assert not slots.is_resident("lora-unloadable")  # no half-loaded slot is left for the next request
    monkeypatch.undo()
    assert len(engine.generate([_prompt(45)], GREEDY, ["lora-unloadable"])[0]) == GREEDY.max_tokens


def test_a_failure_every_sequence_has_is_the_engines(engine: LLMEngine, monkeypatch) -> None:
    monkeypatch.setattr(engine.runner, "run", _fault)
    engine.add_request("a", _prompt(1), GREEDY)
    engine.add_request("b", _prompt(2), GREEDY, "lora")
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.step()
    engine.abort_request("a")
    engine.abort_request("b")
    assert not engine.has_unfinished()


def test_non_finite_keys_and_values_never_reach_other_sequences(tiny_model_dir: Path, adapters) -> None:
    # A fresh engine: the overflowing request is admitted first, so it owns block 0, and its long prompt is prefilled
    # in chunks beside shorter prompts; its blocks are then reused. Attention pads short contexts and must never
    # read (even masked) another sequence's cache slots or stale ones past a context's end: 0 * inf is NaN.
    config = ServeConfig(
        model=tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=4, max_batch_tokens=24, adapters=adapters
    )
    with served_bound_lifted():
        engine = LLMEngine(config)
    bad = Req("bad", [0, *range(10, 70)], FAULTY, "lora-overflow")
    good = [Req(f"good-{i}", _prompt(61 + i), GREEDY, [None, "lora", "ia3", "prefix"][i % 4]) for i in range(8)]
    tokens, final = run(engine, [bad, *good])
    _check(tokens, final, run(engine, good)[0], "bad", "not finite")

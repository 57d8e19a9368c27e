"""Pure, CPU-cheap pieces of the engine: sampling, incremental detokenization, block accounting, scheduling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from switchboard.serving.engine.block_manager import BlockManager
from switchboard.serving.engine.detokenizer import IncrementalDetokenizer
from switchboard.serving.engine.request import FinishReason, SamplingParams
from switchboard.serving.engine.sampler import _filter, sample
from switchboard.serving.engine.scheduler import Scheduler
from switchboard.serving.engine.sequence import Sequence


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _seq(tokenizer, prompt: list[int], **params) -> Sequence:
    p = SamplingParams(**params)
    return Sequence("r", 0, prompt, p, IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt, p.stop))


# ---- sampler ------------------------------------------------------------------------------------------------
def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    tokens, lps = sample(logits, [SamplingParams(temperature=0.0)] * 2, [None, None])
    assert tokens == [1, 0] and lps == [None, None]


def test_top_k_and_top_p_filter() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(_filter(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # Nucleus 0.7: 0.5 alone is below it, 0.5 + 0.3 reaches it; the rest is dropped.
    assert torch.isinf(_filter(logits, 0, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(_filter(logits, 0, 0.5)).tolist() == [False, True, True, True]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(2000, 1)
    params = [SamplingParams(temperature=1.0, seed=7)] * 2000
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2000)]
    a, _ = sample(logits, params, gens)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2000)]
    b, _ = sample(logits, params, gens)
    assert a == b
    share = a.count(0) / len(a)
    assert 0.65 < share < 0.75


def test_logprobs_are_log_softmax_of_the_model_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    _, lps = sample(logits, [SamplingParams(temperature=0.0, logprobs=2)], [None])
    ref = torch.log_softmax(logits[0], -1)
    assert lps[0].token_id == 0 and lps[0].logprob == pytest.approx(ref[0].item())
    assert [t for t, _ in lps[0].top] == [0, 1]


# ---- detokenizer --------------------------------------------------------------------------------------------
def test_deltas_join_to_the_full_decode_and_never_split_a_character(tokenizer) -> None:
    text = "héllo wörld ✓ 日本語 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [tokenizer.bos_token_id], [])
    pieces = []
    for t in ids:
        detok.add(t)
        pieces.append(detok.take(final=False))
    pieces.append(detok.take(final=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_the_text_and_is_never_streamed(tokenizer) -> None:
    ids = tokenizer("one two STOP three", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [0], ["STOP"])
    streamed, matched = "", None
    for t in ids:
        matched = detok.add(t)
        if matched:
            break
        streamed += detok.take(final=False)
    streamed += detok.take(final=True)
    assert matched == "STOP" and streamed == "one two "


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    ids = tokenizer("abc xyz", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [0], ["xyz", "c x"])
    for t in ids:
        if detok.add(t):
            break
    assert detok.take(final=True) == "ab"


# ---- blocks and scheduling ----------------------------------------------------------------------------------
def test_block_manager_grows_and_frees(tokenizer) -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = _seq(tokenizer, [1] * 5)
    assert bm.blocks_needed(seq, 5) == 2
    bm.grow(seq, 5)
    assert bm.num_free == 2 and len(seq.block_table) == 2
    assert bm.slot(seq, 5) == seq.block_table[1] * 4 + 1
    assert not bm.can_grow(seq, 17)
    bm.free(seq)
    assert bm.num_free == 4 and seq.block_table == []


def test_scheduler_respects_token_budget_and_max_num_seqs(tokenizer) -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_batch_tokens=10)
    seqs = [_seq(tokenizer, [1] * 8) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.num_tokens for s in out.prefills] == [8, 2]  # second prompt chunked by the budget
    assert len(sched.running) == 2 and len(sched.waiting) == 1  # max_num_seqs
    for s in out.scheduled:
        s.seq.num_computed += s.num_tokens
    out = sched.schedule()
    # The first sequence has computed its prompt but sampled nothing here, so it has no uncomputed token.
    assert [(s.seq is seqs[1], s.num_tokens) for s in out.prefills] == [(True, 6)]


def test_scheduler_preempts_the_newest_when_blocks_run_out(tokenizer) -> None:
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_batch_tokens=100)
    a, b = _seq(tokenizer, [1] * 8), _seq(tokenizer, [1] * 8)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert len(out.prefills) == 2 and sched.blocks.num_free == 0
    for s in out.scheduled:
        s.seq.num_computed += s.num_tokens
        s.seq.output_token_ids.append(5)  # each sampled a token: the 9th needs a third block
    out = sched.schedule()
    assert out.num_preempted == 1 and sched.waiting[0] is b and b.num_computed == 0
    assert [s.seq for s in out.decodes] == [a]


def test_finish_frees_blocks_wherever_the_sequence_is(tokenizer) -> None:
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_batch_tokens=100)
    a, b = _seq(tokenizer, [1] * 4), _seq(tokenizer, [1] * 4)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    assert not sched.has_work() and sched.blocks.num_free == 8

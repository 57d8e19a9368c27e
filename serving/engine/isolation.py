"""Failure isolation inside a step: whatever one sequence's stage raises ends that sequence alone.

`fail(seq, message)` (the engine's) ends one sequence with FinishReason.ERROR and frees what it holds. `guard` runs
one sequence's stage (prefix write, detokenize, stop strings); `forward` and `sample` run a batched stage and, when
it raises, run it again per sequence to find the ones that fail alone. The rest then go on exactly as if the
culprits had never been in the batch. A failure that no single sequence explains is the engine's and is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .guided import token_masks
from .logits_processors import TokenHistory
from .request import TokenLogprob
from .sampler import sample as sample_batch
from .scheduler import ScheduledSeq, SchedulerOutput
from .sequence import Sequence

log = logging.getLogger(__name__)

Fail = Callable[[Sequence, str], None]


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def guard(fail: Fail, seq: Sequence, what: str, fn: Callable[..., object], *args: object) -> bool:
    """Run one sequence's stage; if it raises, end that sequence alone. Whether it succeeded."""
    try:
        fn(*args)
    except Exception as exc:  # anything one sequence's own stage raises is that sequence's failure
        log.exception("request %s failed while %s", seq.request_id, what)
        fail(seq, f"internal error while {what}: {_describe(exc)}")
        return False
    return True


def running(plan: SchedulerOutput) -> SchedulerOutput:
    """The plan without the sequences that failed since it was made."""
    return SchedulerOutput(
        decodes=[s for s in plan.decodes if not s.seq.is_finished],
        prefills=[s for s in plan.prefills if not s.seq.is_finished],
    )


def _only(plan: SchedulerOutput, s: ScheduledSeq) -> SchedulerOutput:
    return SchedulerOutput(decodes=[s]) if s in plan.decodes else SchedulerOutput(prefills=[s])


def forward(
    run: Callable[[SchedulerOutput], torch.Tensor], plan: SchedulerOutput, fail: Fail
) -> tuple[SchedulerOutput, torch.Tensor]:
    """`run(plan)` (the model step: logits [N, V]). When it raises, each sequence runs alone: those that fail alone
    are ended and the others run again as one batch. If none fails alone, or every one of a batch of several does,
    the fault is the engine's (the model, the cache, a kernel for everyone): the first error is raised.

    Running again is safe: a forward writes only this step's keys and values, at the same cache slots each time."""
    try:
        return plan, run(plan)
    except Exception as exc:
        error = exc
    log.exception("a model step of %d sequences failed; running each alone", len(plan.scheduled), exc_info=error)
    culprits: list[tuple[Sequence, Exception]] = []
    for s in plan.scheduled:
        try:
            run(_only(plan, s))
        except Exception as exc:  # this sequence alone makes the step fail
            culprits.append((s.seq, exc))
    if not culprits or len(culprits) == len(plan.scheduled) > 1:
        raise error
    for seq, exc in culprits:
        fail(seq, f"internal error in the model step: {_describe(exc)}")
    plan = running(plan)
    return plan, run(plan) if plan.scheduled else torch.empty(0, 0)


def sample(
    logits: torch.Tensor, seqs: list[Sequence], fail: Fail, eos_token_ids: set[int] | frozenset[int] = frozenset()
) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """The sampler over the batch (token None: non-finite logits), guided rows under their grammar's mask; if it
    raises, each row alone from the same generator states, so that seeded sequences draw exactly what they would
    have drawn, and the rows that still raise are ended."""
    generators = [s.generator for s in seqs]
    states = [g.get_state() if g is not None else None for g in generators]
    history = [TokenHistory(s.prompt_token_ids, s.output_token_ids) for s in seqs]
    eos = sorted(eos_token_ids)
    vocab_size = logits.shape[-1]
    try:
        masks = token_masks([s.guided for s in seqs], vocab_size)
        return sample_batch(logits, [s.params for s in seqs], generators, history, eos, masks)
    except Exception:
        log.exception("sampling %d sequences failed; sampling each alone", len(seqs))
    tokens: list[int | None] = [None] * len(seqs)
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    for i, (seq, generator, state) in enumerate(zip(seqs, generators, states, strict=True)):
        if generator is not None and state is not None:
            generator.set_state(state)
        try:
            masks = token_masks([seq.guided], vocab_size)
            (tokens[i],), (logprobs[i],) = sample_batch(
                logits[i : i + 1], [seq.params], [generator], history[i : i + 1], eos, masks
            )
        except Exception as exc:  # this row alone fails to sample
            fail(seq, f"internal error while sampling: {_describe(exc)}")
    return tokens, logprobs

"""Per-request sampling over one step's logits: greedy rows in one argmax, the rest filtered and drawn.

Safe for every `SamplingParams` value: the most likely token always survives top-k and top-p (as in vLLM), and a
sampled row is computed in float64 from logits shifted so that their maximum is 0, so no temperature and no spread
of finite logits can make a NaN. A row whose logits are not all finite (an adapter that overflows, a broken model
output) is not sampled: its token is None and the engine ends that sequence alone.

vLLM's logits processors (penalties, logit bias, min_tokens, bad words, allowed tokens: logits_processors.py) act
on the rows before the choice; min_p acts after the temperature, before top-k and top-p, as in vLLM. Logprobs are
those of the model's raw logits (vLLM's default `raw_logprobs`), whatever the processors did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch

from switchboard.kernels import cpu_step

from .guided import TokenMasks, apply_token_masks
from .logits_processors import TokenHistory, process_logits
from .request import SamplingParams, TokenLogprob


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and the top-p nucleus with -inf; the largest logit always stays. logits: [V]."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the first one stays however small top_p is.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def min_p_filter(row: torch.Tensor, min_p: float) -> torch.Tensor:
    """Mask tokens whose probability is below `min_p` times the most likely one's. row: [V], after the temperature
    and shifted so that its maximum is 0 (then a token's probability over the top one's is exp(row))."""
    if min_p <= 0.0:
        return row
    return row.masked_fill(row < math.log(min_p), float("-inf"))


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a row of logits [V] (finite, or -inf where a processor masked) under temperature, min-p,
    top-k and top-p."""
    row = logits.double()
    row = (row - row.max()) / p.temperature  # <= 0 with the maximum exactly 0: never NaN, never +inf
    probs = _filter(min_p_filter(row, p.min_p), p.top_k, p.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row is finite. A row's sum is NaN or infinite when the row holds a NaN or an infinity, so one
    summing pass clears the common case (torch's aminmax took 2.5 ms on 32 rows of a 49k vocabulary, the sum 0.04 ms);
    a sum can also overflow on finite values past about 1e34, so rows it does not clear are checked element-wise."""
    finite = torch.isfinite(logits.sum(-1))
    if not bool(finite.all()):
        suspect = torch.nonzero(~finite, as_tuple=True)[0]
        finite[suspect] = torch.isfinite(logits[suspect]).all(-1)
    return finite.tolist()


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum: torch's argmax, or on float32 CPU rows the compiled one (0.09 ms a step, not 0.73)."""
    compiled = logits.is_cpu and logits.dtype == torch.float32 and logits.stride(-1) == 1
    if compiled and cpu_step.compiled_step_available():
        return cpu_step.argmax_rows(logits)
    return logits.argmax(-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: list[TokenHistory] | None = None,
    eos_token_ids: Seq[int] = (),
    masks: TokenMasks | None = None,
) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """logits: [N, V] float32, one row per sequence that samples this step; `history`: each row's prompt and output
    tokens (what penalties, min_tokens and bad words read; required when a row uses one); `masks`: the tokens each
    guided row may choose (structured output), applied after the processors. Returns token ids (None for a row whose
    logits are not finite) and logprobs."""
    finite = _finite_rows(logits)
    if history is None and any(p.processes_logits for p in params):
        raise ValueError("penalties, min_tokens, logit_bias and bad words need each row's token history")
    processed = logits if history is None else process_logits(logits, params, history, eos_token_ids)
    choosable = apply_token_masks(processed, masks)  # a guided row keeps its grammar's tokens only
    if masks is not None and processed is not logits:
        # The grammar's tokens and the processors' (allowed_token_ids, bad words, min_tokens) may not meet: the
        # grammar wins, from the raw logits, so the choice can still end (e.g. on EOS) instead of drawing a token
        # nothing allows.
        dead = ~torch.isfinite(choosable).any(-1)
        if bool(dead.any()):
            choosable[dead] = apply_token_masks(logits, masks)[dead]
    tokens: list[int | None] = _argmax(choosable).tolist()  # every greedy row, and a default for the rest
    for i, p in enumerate(params):
        if not finite[i]:
            tokens[i] = None
        elif not p.greedy:
            tokens[i] = _draw(choosable[i], p, generators[i])
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wants = [i for i, p in enumerate(params) if p.logprobs is not None and finite[i]]
    if wants:
        lp = torch.log_softmax(logits[wants], dim=-1)
        for row, i in enumerate(wants):
            token = tokens[i]
            assert token is not None
            k = min(params[i].logprobs or 0, lp.shape[-1])
            top = torch.topk(lp[row], k) if k else None
            logprobs[i] = TokenLogprob(
                token_id=token,
                logprob=float(lp[row, token]),
                top=[] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=False)),
            )
    return tokens, logprobs

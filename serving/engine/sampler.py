"""Per-request sampling over one step's logits: greedy rows in one argmax, the rest filtered and drawn.

Safe for every `SamplingParams` value: the most likely token always survives top-k and top-p (as in vLLM), and a
sampled row is computed in float64 from logits shifted so that their maximum is 0, so no temperature and no spread
of finite logits can make a NaN. A row whose logits are not all finite (an adapter that overflows, a broken model
output) is not sampled: its token is None and the engine ends that sequence alone.
"""

from __future__ import annotations

import torch

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


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a finite row of logits [V] under temperature, top-k and top-p."""
    row = logits.double()
    row = (row - row.max()) / p.temperature  # <= 0 with the maximum exactly 0: never NaN, never +inf
    probs = _filter(row, p.top_k, p.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """logits: [N, V] float32, one row per sequence that samples this step. Returns token ids (None for a row whose
    logits are not finite) and logprobs."""
    # One pass for both ends of each row (NaN propagates into them): cheaper than a [N, V] isfinite mask and all().
    lo, hi = torch.aminmax(logits, dim=-1)
    finite = (torch.isfinite(lo) & torch.isfinite(hi)).tolist()
    tokens: list[int | None] = logits.argmax(-1).tolist()  # every greedy row, and a default for the rest
    for i, p in enumerate(params):
        if not finite[i]:
            tokens[i] = None
        elif not p.greedy:
            tokens[i] = _draw(logits[i], p, generators[i])
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

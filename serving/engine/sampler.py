"""Per-request sampling over one step's logits: greedy rows in one argmax, the rest filtered and drawn."""

from __future__ import annotations

import torch

from .request import SamplingParams, TokenLogprob


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and the top-p nucleus with -inf. logits: [V] float32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [N, V] float32, one row per sequence that samples this step. Returns token ids and logprobs."""
    tokens = logits.argmax(-1).tolist()  # every greedy row, and a default for the rest
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wants = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wants:
        lp = torch.log_softmax(logits[wants], dim=-1)
        for row, i in enumerate(wants):
            k = params[i].logprobs or 0
            top = torch.topk(lp[row], k) if k else None
            logprobs[i] = TokenLogprob(
                token_id=tokens[i],
                logprob=float(lp[row, tokens[i]]),
                top=[] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=False)),
            )
    return tokens, logprobs

"""vLLM's logits processors over one step's batch: allowed tokens, bad words, min_tokens, logit bias, penalties.

Semantics (vLLM v1's order and definitions; `logits` [N, V] float32, one row per sampling sequence):

    for each row i with params p, prompt tokens P_i and output tokens O_i:
        if p.allowed_token_ids: logits[i, t] = -inf for every t not in it
        for each bad word w (token ids): if O_i ends with w[:-1]: logits[i, w[-1]] = -inf
        if len(O_i) < p.min_tokens: logits[i, t] = -inf for t in p.stop_token_ids and the EOS ids (unless ignore_eos)
        logits[i, t] += p.logit_bias[t]
        seen = P_i | O_i
        logits[i, t] = logits[i, t] / r if logits[i, t] > 0 else logits[i, t] * r   for t in seen (r: repetition)
        logits[i, t] -= p.frequency_penalty * count(t in O_i) + p.presence_penalty * (t in O_i)

Every stage is a handful of tensor ops over the rows that use it (index tensors and one scatter each); rows that use
none are not touched, so plain requests in a mixed batch cost nothing. `min_p` acts on probabilities after the
temperature and lives in the sampler (`sampler.py`).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from .request import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenHistory:
    """What the penalties read of one sequence: its prompt and the tokens it has generated so far."""

    prompt: Seq[int]
    output: Seq[int]


def _padded(rows: list[Seq[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Lists of token ids as one [R, max_len] long tensor, padded with `pad` (an index past the vocabulary)."""
    width = max((len(r) for r in rows), default=0)
    flat = [list(r) + [pad] * (width - len(r)) for r in rows]
    return torch.tensor(flat, dtype=torch.long, device=device).view(len(rows), width)


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[Seq[int]],
    output_ids: list[Seq[int]],
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties. logits [R, V]; prompt_ids, output_ids: R lists; repetition, frequency, presence [R].

    Semantics: repetition divides positive logits (multiplies negative ones) of every token seen in the prompt or
    the output by `repetition`; then presence subtracts `presence` once from each token in the output and frequency
    `frequency` per occurrence there. Returns a new tensor.

    Only the seen tokens' columns are touched (a gather and a scatter over [R, tokens] each), never a dense [R, V]
    count: on a busy CPU every full-width op costs a thread synchronisation. Padding points at an extra column V, so
    duplicate and padded indices write the same values and the scatters stay deterministic."""
    rows, vocab = logits.shape
    dev = logits.device
    ext = torch.cat([logits, logits.new_zeros(rows, 1)], dim=1)  # [R, V + 1]; column V absorbs the padding
    seen = _padded([[*p, *o] for p, o in zip(prompt_ids, output_ids, strict=True)], vocab, dev)  # [R, P + O]
    values = ext.gather(1, seen)
    r = repetition[:, None]
    ext.scatter_(1, seen, torch.where(values > 0, values / r, values * r))
    out = _padded(list(output_ids), vocab, dev)  # [R, O]
    if out.shape[1]:
        ext.scatter_(1, out, ext.gather(1, out) - presence[:, None])  # each token once, however often it occurs
        ext.scatter_add_(1, out, (-frequency[:, None]).expand(out.shape).contiguous())
    return ext[:, :vocab]


def _scatter(
    logits: torch.Tensor, rows: list[int], cols: list[int], values: torch.Tensor | float, *, add: bool
) -> None:
    """logits[rows[j], cols[j]] (+)= values[j] in place; one indexed op for the whole batch."""
    if not rows:
        return
    r = torch.tensor(rows, dtype=torch.long, device=logits.device)
    c = torch.tensor(cols, dtype=torch.long, device=logits.device)
    if add:
        logits.index_put_((r, c), torch.as_tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)
    else:
        logits.index_put_((r, c), torch.as_tensor(values, dtype=logits.dtype, device=logits.device))


def banned_tokens(bad_words: Seq[Seq[int]], output: Seq[int]) -> list[int]:
    """The last token of every bad word whose other tokens end the output (vLLM: the output only, not the prompt)."""
    banned = []
    for word in bad_words:
        head = len(word) - 1
        if head <= len(output) and (head == 0 or list(output[-head:]) == list(word[:-1])):
            banned.append(word[-1])
    return banned


def apply_masks_and_bias(
    logits: torch.Tensor, params: list[SamplingParams], history: list[TokenHistory], eos_token_ids: Seq[int]
) -> None:
    """allowed_token_ids, bad words, min_tokens and logit_bias, in place (rows that use none are untouched)."""
    allowed = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if allowed:
        keep = torch.zeros(len(allowed), logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep_rows = [j for j, i in enumerate(allowed) for _ in params[i].allowed_token_ids]
        keep_cols = [t for i in allowed for t in params[i].allowed_token_ids]
        keep[torch.tensor(keep_rows, device=logits.device), torch.tensor(keep_cols, device=logits.device)] = True
        index = torch.tensor(allowed, device=logits.device)
        logits[index] = logits[index].masked_fill(~keep, float("-inf"))
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, p in enumerate(params):
        if p.bad_words_token_ids:
            banned = banned_tokens(p.bad_words_token_ids, history[i].output)
            ban_rows += [i] * len(banned)
            ban_cols += banned
        if len(history[i].output) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            ban_rows += [i] * len(stops)
            ban_cols += stops
    _scatter(logits, ban_rows, ban_cols, float("-inf"), add=False)
    bias_rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
    if bias_rows:
        cols = [t for p in params for t in p.logit_bias]
        values = torch.tensor([b for p in params for b in p.logit_bias.values()], dtype=logits.dtype)
        _scatter(logits, bias_rows, cols, values, add=True)


def process_logits(
    logits: torch.Tensor, params: list[SamplingParams], history: list[TokenHistory], eos_token_ids: Seq[int]
) -> torch.Tensor:
    """Every processor above, in vLLM's order; returns `logits` itself when no row uses any (the common case)."""
    if not any(p.processes_logits for p in params):
        return logits
    return _finite_where_possible(_process(logits.clone(), params, history, eos_token_ids), logits)


def _finite_where_possible(processed: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The processors can overflow (a repetition penalty near 0 divides a positive logit to +inf) or mask a whole row
    (every allowed token a bad word): +inf becomes the largest float, NaN is masked, and a row left with no finite
    logit falls back to the model's own, so that sampling never meets a NaN."""
    finite_max = torch.finfo(processed.dtype).max
    processed = processed.nan_to_num(nan=float("-inf"), posinf=finite_max, neginf=float("-inf"))
    dead = ~torch.isfinite(processed).any(-1)
    if bool(dead.any()):
        processed[dead] = raw[dead]
    return processed


def _process(
    logits: torch.Tensor, params: list[SamplingParams], history: list[TokenHistory], eos_token_ids: Seq[int]
) -> torch.Tensor:
    """process_logits on a copy it may change in place."""
    apply_masks_and_bias(logits, params, history, eos_token_ids)
    rows = [i for i, p in enumerate(params) if p.penalized]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        ps = [params[i] for i in rows]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=logits.dtype, device=logits.device)

        every = len(rows) == len(params)
        penalized = apply_penalties(
            logits if every else logits[index],
            [history[i].prompt for i in rows],
            [history[i].output for i in rows],
            column([p.repetition_penalty for p in ps]),
            column([p.frequency_penalty for p in ps]),
            column([p.presence_penalty for p in ps]),
        )
        if every:
            return penalized
        logits[index] = penalized
    return logits

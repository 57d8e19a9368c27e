"""Our request and output dataclasses to and from vLLM's: the API layer never sees a vLLM type.

vLLM streams deltas (`RequestOutputKind.DELTA`): each of its outputs holds, per choice that advanced, the tokens,
text and logprobs added since the previous one. Its detokenizer already holds back partial UTF-8 characters and cuts
stop strings, as ours does; greedy below temperature 1e-5 and `top_k` 0 meaning off are the same rules as ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import vllm
from vllm.sampling_params import RequestOutputKind

from switchboard.serving.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "error": FinishReason.ERROR,
}


def vllm_sampling_params(params: SamplingParams) -> vllm.SamplingParams:
    """vLLM's own parameters for ours; ValueError (a 400) for what this backend cannot carry over."""
    if params.prompt_logprobs is not None:
        raise ValueError("`echo` with `logprobs` (prompt logprobs) is not available with --backend vllm")
    if params.bad_words_token_ids:
        raise ValueError("`bad_words` is not available with --backend vllm")
    return vllm.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        max_tokens=params.max_tokens,
        logprobs=params.logprobs,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        min_p=params.min_p,
        min_tokens=params.min_tokens,
        logit_bias=dict(params.logit_bias) or None,
        allowed_token_ids=list(params.allowed_token_ids) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


@dataclass(slots=True)
class OutputConverter:
    """One request's vLLM outputs -> our per-choice `RequestOutput`s (counting each choice's tokens)."""

    request_id: str
    prompt_tokens: int
    num_logprobs: int | None  # SamplingParams.logprobs: alternatives reported per token
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def convert(self, out: vllm.RequestOutput) -> list[RequestOutput]:
        converted = []
        for choice in out.outputs:
            count = self.completion_tokens.get(choice.index, 0) + len(choice.token_ids)
            self.completion_tokens[choice.index] = count
            reason = None if choice.finish_reason is None else FINISH_REASONS.get(choice.finish_reason)
            if choice.finish_reason is not None and reason is None:
                reason = FinishReason.ERROR
            converted.append(
                RequestOutput(
                    request_id=self.request_id,
                    index=choice.index,
                    new_text=choice.text,
                    new_token_ids=list(choice.token_ids),
                    logprobs=_logprobs(choice.token_ids, choice.logprobs, self.num_logprobs or 0),
                    finished=choice.finish_reason is not None,
                    finish_reason=reason,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=count,
                    error=None if reason is not FinishReason.ERROR else f"vLLM ended it: {choice.finish_reason}",
                )
            )
        return converted


def _logprobs(token_ids: list[int], entries: list[dict] | None, k: int) -> list[TokenLogprob] | None:
    """vLLM gives, per new token, {token id: Logprob(logprob, rank, ...)}: the k most likely (ranks 1..k) and the
    sampled token, whatever its rank."""
    if entries is None:
        return None
    result = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k)
        result.append(TokenLogprob(token_id, entry[token_id].logprob, [(tid, logprob) for _, tid, logprob in top]))
    return result

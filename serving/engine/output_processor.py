"""Text for the engine core's outputs, in the API process: detokenization and stop strings per choice.

The core sends token ids only. Here each choice's tokens go through its `IncrementalDetokenizer`; a stop string
ends the choice at once (its text cut before the string, the tokens after it dropped) and asks the core to stop
generating for it, as vLLM's output processor does. A tokenizer failure ends that choice alone with an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tokenizers import Tokenizer

from .detokenizer import IncrementalDetokenizer
from .request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class _Choice:
    __slots__ = ("detokenizer", "done", "num_tokens")

    def __init__(self, detokenizer: IncrementalDetokenizer) -> None:
        self.detokenizer = detokenizer
        self.num_tokens = 0
        self.done = False


class RequestTexts:
    """The choices of one request."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stop_choice: Callable[[int], None],  # ask the core to stop generating choice `index`
    ) -> None:
        self._choices = [
            _Choice(
                IncrementalDetokenizer(
                    tokenizer,
                    prompt_token_ids,
                    params.stop,
                    include_stop=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                )
            )
            for _ in range(params.n)
        ]
        self._params = params
        self._stop_choice = stop_choice

    def process(self, out: RequestOutput) -> RequestOutput | None:
        """`out` with its text (None once the choice has ended here: the core's later tokens are dropped)."""
        choice = self._choices[out.index]
        if choice.done:
            return None
        try:
            stopped_at = self._detokenize(choice, out)
        except Exception as exc:  # a tokenizer failure: this choice ends alone
            log.exception("detokenizing request %s (choice %d) failed", out.request_id, out.index)
            choice.done = True
            if not out.finished:
                self._stop_choice(out.index)
            message = f"processing its new token failed: {type(exc).__name__}: {exc}"
            return _ended(out, [], FinishReason.ERROR, choice.num_tokens, message)
        if stopped_at is not None:  # a stop string: the core goes on until told, its later tokens are not ours
            choice.done = True
            if not out.finished:
                self._stop_choice(out.index)
            ended = _ended(out, out.new_token_ids[:stopped_at], FinishReason.STOP, choice.num_tokens, None)
            ended.new_text = choice.detokenizer.take(final=True)
            return ended
        choice.done = out.finished
        out.new_text = choice.detokenizer.take(final=out.finished)
        out.completion_tokens = choice.num_tokens
        return out

    def _detokenize(self, choice: _Choice, out: RequestOutput) -> int | None:
        """Feed the new tokens; None, or how many belong to the output when one completes a stop string.

        As `LLMEngine._stops` does in one process: no stop string ends a choice before `min_tokens` tokens, and the
        token the core stopped on (EOS, a stop token, a grammar's end) adds its text only with
        include_stop_str_in_output."""
        p = self._params
        stopped_by_core = out.finished and out.finish_reason is FinishReason.STOP
        last = len(out.new_token_ids) - 1
        for i, token in enumerate(out.new_token_ids):
            choice.num_tokens += 1
            if i == last and stopped_by_core:
                if p.include_stop_str_in_output and p.guided is None:
                    choice.detokenizer.add(token, check_stop=False)
                return None
            if choice.detokenizer.add(token, check_stop=choice.num_tokens >= p.min_tokens) is not None:
                return i + 1
        return None


def _ended(
    out: RequestOutput, tokens: list[int], reason: FinishReason, num_tokens: int, error: str | None
) -> RequestOutput:
    return RequestOutput(
        request_id=out.request_id,
        index=out.index,
        new_text="",
        new_token_ids=tokens,
        logprobs=None if out.logprobs is None else out.logprobs[: len(tokens)],
        finished=True,
        finish_reason=reason,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=num_tokens,
        error=error,
        prompt_logprobs=out.prompt_logprobs,
    )

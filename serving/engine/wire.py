"""The messages between the API process and the engine core process, as msgpack frames over ZeroMQ.

Each frame is one msgpack array whose first item names the message. Requests carry token ids, never text; outputs
carry token ids, never text (the API process detokenizes). Tuples instead of maps on the hot path: one step's
outputs are one frame of small arrays, about 30 bytes a token. The start-up configuration crosses once, pickled
(`core.py`), which is safe only because both ends are our own two processes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .guided import Grammar, GuidedKind, GuidedSpec
from .llm_engine import AdapterStats
from .request import FinishReason, RequestOutput, SamplingParams, TokenLogprob


class ToCore(enum.IntEnum):
    ADD = 0  # [ADD, request_id, prompt_token_ids, params, adapter_key, adapter_path, tenant]
    ABORT = 1  # [ABORT, request_id, index or None (every choice)]
    RETIRE = 2  # [RETIRE, adapter_key]
    SHUTDOWN = 3  # [SHUTDOWN]


class FromCore(enum.IntEnum):
    READY = 0  # [READY, info]: the model is loaded
    FAILED = 1  # [FAILED, a usage error (ValueError and the like)?, "type: message", message]: start-up failed
    OUTPUTS = 2  # [OUTPUTS, [output, ...], snapshot or None]
    REFUSED = 3  # [REFUSED, request_id, Refusal, message]: the request never started


class Refusal(enum.IntEnum):
    INVALID = 0  # ValueError: the API answers 400
    UNKNOWN_ADAPTER = 1  # KeyError: 404
    FAILED = 2  # anything else: 500


# Strings cross as UTF-8 with lone surrogates passed through: JSON lets a client send "\ud800" (a stop string, a
# grammar's source), and the thread engine accepts it, so the core must too.
_UNICODE_ERRORS = "surrogatepass"


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True, unicode_errors=_UNICODE_ERRORS)


def unpack(frame: bytes) -> list[Any]:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False, unicode_errors=_UNICODE_ERRORS)


# ---- requests -----------------------------------------------------------------------------------------------------
def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    """Every field by name, so that a field added to SamplingParams crosses without a change here; a compiled
    grammar crosses as its spec (kind and source), which the core compiles again from its own cache."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    if params.guided is not None:
        fields["guided"] = [params.guided.spec.kind.value, params.guided.spec.source]
    return fields


def params_from_wire(fields: dict[str, Any], compile_grammar: Callable[[GuidedSpec], Grammar]) -> SamplingParams:
    """The request's parameters; its grammar compiled with `compile_grammar` (GuidedError, a ValueError, if not)."""
    guided = fields.pop("guided")
    params = SamplingParams(**fields)
    if guided is not None:
        params.guided = compile_grammar(GuidedSpec(GuidedKind(guided[0]), guided[1]))
    return params


# ---- outputs ------------------------------------------------------------------------------------------------------
_REASONS = list(FinishReason)
_REASON_CODE = {reason: code for code, reason in enumerate(_REASONS)}


def _logprobs_to_wire(logprobs: list[TokenLogprob | None] | None) -> list[Any] | None:
    if logprobs is None:
        return None
    return [None if lp is None else [lp.token_id, lp.logprob, lp.top] for lp in logprobs]


def _logprobs_from_wire(items: list[Any] | None) -> list[Any] | None:
    if items is None:
        return None
    return [None if item is None else TokenLogprob(item[0], item[1], [(a, b) for a, b in item[2]]) for item in items]


def output_to_wire(out: RequestOutput) -> list[Any]:
    """[request_id, index, token_ids, finished, reason code or -1, prompt_tokens, completion_tokens, error, logprobs,
    prompt_logprobs]"""
    reason = -1 if out.finish_reason is None else _REASON_CODE[out.finish_reason]
    return [
        out.request_id,
        out.index,
        out.new_token_ids,
        out.finished,
        reason,
        out.prompt_tokens,
        out.completion_tokens,
        out.error,
        _logprobs_to_wire(out.logprobs),
        _logprobs_to_wire(out.prompt_logprobs),
    ]


def output_from_wire(item: list[Any]) -> RequestOutput:
    """The engine's output without text (`new_text` empty): the API process's output processor adds it."""
    request_id, index, token_ids, finished, reason, prompt_tokens, completion_tokens, error, logprobs, prompt_lps = item
    return RequestOutput(
        request_id=request_id,
        index=index,
        new_text="",
        new_token_ids=token_ids,
        logprobs=_logprobs_from_wire(logprobs),
        finished=finished,
        finish_reason=None if reason < 0 else _REASONS[reason],
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        error=error,
        prompt_logprobs=_logprobs_from_wire(prompt_lps),
    )


# ---- what the core reports between steps --------------------------------------------------------------------------
@dataclass(slots=True)
class Snapshot:
    """The core's counters as of one moment: the engine's stats, the device and host tiers, and how many ADD
    messages it has taken in (the API counts the ones sent since as waiting, for its overload checks)."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    num_preemptions: int = 0
    adds_applied: int = 0
    waiting_by_tenant: dict[str, int] = dataclasses.field(default_factory=dict)  # only with --api-keys
    # the device tier and the running and waiting adapters, as `LLMEngine.adapter_stats()` gives them
    adapters: AdapterStats = dataclasses.field(default_factory=lambda: AdapterStats(0, 0, 0, 0, 0, [], []))
    # the core's host tier (HostStats): hits, misses, loads, evictions, size
    host: list[int] = dataclasses.field(default_factory=lambda: [0, 0, 0, 0, 0])
    load_seconds: list[float] = dataclasses.field(default_factory=list)  # adapter parses since the last snapshot

    def to_wire(self) -> list[Any]:
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return [dataclasses.astuple(v) if isinstance(v, AdapterStats) else v for v in values]

    @classmethod
    def from_wire(cls, values: list[Any]) -> Snapshot:
        snapshot = cls(*values)
        snapshot.adapters = AdapterStats(*snapshot.adapters)  # type: ignore[misc]  # its fields, in order
        return snapshot

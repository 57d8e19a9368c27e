"""`switchboard serve --backend vllm`: vLLM's AsyncLLM, in process, behind the API's `Engine` protocol.

The HTTP API, tenants, the adapter store, uploads and metrics stay ours; vLLM schedules and runs the model. Prompts
reach it as token ids (our tokenizer and chat template, as on the native engine), each request's LoRA adapter as a
`LoRARequest` for its store version (lora.py), and its outputs come back as our `RequestOutput`s (convert.py).
vLLM serves LoRA only: other kinds answer 422 at upload and at request time. `--tensor-parallel-size`,
`--pipeline-parallel-size` and `--distributed-executor-backend ray` pass through for multi-GPU and multi-node.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import aclosing
from pathlib import Path
from typing import Any

from vllm import AsyncEngineArgs, TokensPrompt
from vllm.config import VllmConfig
from vllm.exceptions import VLLMClientError
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from switchboard.adapters_store.kinds import AdapterKind, load_adapter
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine.llm_engine import AdapterStats, EngineStats, load_tokenizer
from switchboard.serving.engine.request import AdapterInput, EngineOverloaded, RequestOutput, SamplingParams
from switchboard.serving.models.config import ModelConfig
from switchboard.serving.vllm_backend.checkpoint import checkpoint_weight_bytes
from switchboard.serving.vllm_backend.convert import OutputConverter, vllm_sampling_params
from switchboard.serving.vllm_backend.lora import LoraVersions

log = logging.getLogger(__name__)

SERVED_KINDS = frozenset({AdapterKind.LORA.value})
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


class _SchedulerGauges(StatLoggerBase):
    """Keeps vLLM's latest scheduler figures for our /metrics gauges (vLLM calls `record` after each engine step)."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.latest = SchedulerStats()
        self.preemptions = 0

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.latest = scheduler_stats
        if iteration_stats is not None:
            self.preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self) -> None:
        pass


class VllmEngine:
    adapter_input = AdapterInput.DIRECTORY  # vLLM loads each version's PEFT files itself
    host_tier = None  # vLLM holds its LoRA adapters; the API parses nothing
    grammars = None  # structured output is not offered on this backend yet (400 saying so)

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        mc = ModelConfig.from_dir(config.model)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.model_name: str = config.served_model_name or config.model.name
        self.tokenizer = load_tokenizer(config.model)
        self.base_shape = mc.base_shape()
        self.base_weight_bytes = checkpoint_weight_bytes(config.model, config.torch_dtype)
        self.merged_adapter: str | None = None
        startup = {name: load_adapter(path, self.base_shape, name) for name, path in config.adapters.items()}
        self.adapter_kinds: dict[str, str] = {name: a.kind.value for name, a in startup.items()}
        lora_ranks = [a.rank for a in startup.values() if a.kind is AdapterKind.LORA]
        self._loras = LoraVersions({name: config.adapters[name] for name in self.adapter_kinds})
        self._gauges: _SchedulerGauges | None = None
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        if config.torch_device.type == "cpu":
            # vLLM's CPU build keeps one core for itself unless told otherwise; on a small machine that is half of it.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        self._llm = AsyncLLM.from_engine_args(
            engine_args(config, self.max_model_len, max(lora_ranks, default=0)), stat_loggers=[self._gauge_factory]
        )
        self.num_kv_blocks = self._llm.vllm_config.cache_config.num_gpu_blocks or 0

    def _gauge_factory(self, vllm_config: VllmConfig, engine_index: int) -> StatLoggerBase:
        self._gauges = _SchedulerGauges(vllm_config, engine_index)
        return self._gauges

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Call from inside the running event loop: vLLM's output handler runs on it."""
        self._loop = asyncio.get_running_loop()

    def is_alive(self) -> bool:
        """False once vLLM's engine core has died (its requests then fail; /health answers 503)."""
        return not self._llm.errored

    def shutdown(self) -> None:
        self._llm.shutdown()
        self._loras.close()

    # ---- API ------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        latest = self._gauges.latest if self._gauges is not None else SchedulerStats()
        return EngineStats(
            num_running=latest.num_running_reqs,
            num_waiting=latest.num_waiting_reqs,
            num_kv_blocks=self.num_kv_blocks,
            num_free_kv_blocks=round(self.num_kv_blocks * (1.0 - latest.kv_cache_usage)),
            num_preemptions=self._gauges.preemptions if self._gauges is not None else 0,
        )

    def refuses_kind(self, kind: str) -> str | None:
        if kind in SERVED_KINDS:
            return None
        return f"the vLLM backend serves LoRA adapters only, not {kind} (serve it with --backend native)"

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        *,
        adapter: Path | None = None,
        tenant: str = "",
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts it in vLLM.

        `adapter_id`: the version's key (a start-up adapter's name, or `owner/id@sha`); `adapter`: that version's
        directory in the store (None for start-up adapters). `tenant` is unused: vLLM has no fair admission."""
        if self._loop is None:
            raise RuntimeError("the engine is not running")
        if self._inflight >= self.config.max_num_seqs + self.config.max_waiting:
            raise EngineOverloaded(retry_after_s=1)
        lora = None
        if adapter_id is not None:
            try:
                lora = self._loras.acquire(adapter_id, adapter)
            except FileNotFoundError as exc:  # deleted between the lookup and here
                raise ValueError(f"the adapter version {adapter_id!r} was deleted") from exc
        self._inflight += 1
        converter = OutputConverter(request_id, len(prompt_token_ids), params.logprobs)
        prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        try:
            stream = self._llm.generate(prompt, vllm_sampling_params(params), request_id, lora_request=lora)
            async with aclosing(stream):
                async for out in stream:
                    for item in converter.convert(out):
                        yield item
        except VLLMClientError as exc:  # vLLM refused the request itself: the API answers 400
            raise ValueError(str(exc)) from exc
        finally:
            self._inflight -= 1
            if adapter_id is not None:
                self._remove_lora(self._loras.release(adapter_id))

    def retire_adapter(self, adapter_id: str) -> None:
        """An overwritten or deleted version (called from worker threads): requests on it finish, then vLLM drops
        its LoRA id."""
        self._remove_lora(self._loras.retire(adapter_id))

    def adapter_stats(self) -> AdapterStats:
        """The device tier as far as vLLM shows it: its LoRA slots, the versions it was handed."""
        lora = self._llm.vllm_config.lora_config
        latest = self._gauges.latest if self._gauges is not None else SchedulerStats()
        return AdapterStats(
            max_resident=lora.max_loras if lora is not None else 0,
            resident=len(self._loras.known()),
            loads=self._loras.loads,
            hits=self._loras.hits,
            evictions=0,  # vLLM's LRU does not report them
            running=sorted(latest.running_lora_adapters),
            waiting=sorted(latest.waiting_lora_adapters),
        )

    # ---- helpers --------------------------------------------------------------------------------------------
    def _remove_lora(self, lora_id: int | None) -> None:
        if lora_id is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._spawn, self._llm.remove_lora(lora_id))

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = self._loop.create_task(work) if self._loop is not None else None
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def engine_args(config: ServeConfig, max_model_len: int, startup_lora_rank: int) -> AsyncEngineArgs:
    """Our settings in vLLM's terms. `--max-resident-adapters` is vLLM's `max_loras` (LoRAs in one batch),
    `--max-host-adapters` its `max_cpu_loras`; the LoRA rank bound is the smallest vLLM accepts that holds
    `--max-lora-rank` and every start-up adapter."""
    wanted = max(config.max_lora_rank, startup_lora_rank)
    max_lora_rank = next((r for r in LORA_RANKS if r >= wanted), LORA_RANKS[-1])
    cache: dict[str, int] = (
        {"num_gpu_blocks_override": config.num_kv_blocks}
        if config.num_kv_blocks is not None
        else {"kv_cache_memory_bytes": int(config.kv_cache_gb * 2**30)}
    )
    return AsyncEngineArgs(
        model=str(config.model),
        served_model_name=config.served_model_name,
        dtype=config.dtype,
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_batch_tokens,
        enable_lora=True,
        max_loras=config.max_resident_adapters,
        max_cpu_loras=max(config.max_host_adapters, config.max_resident_adapters),
        max_lora_rank=max_lora_rank,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        distributed_executor_backend=config.distributed_executor_backend,
        disable_log_stats=True,  # our gauge logger still receives the figures
        seed=0,
        **cache,
    )

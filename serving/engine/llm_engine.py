"""The synchronous engine: add requests, call `step()` until done. `LLMEngine.step()` is schedule, run, sample,
post-process; the async server drives the same object from one background thread."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from switchboard.adapters_store.kinds import Adapter, AdapterError, BaseModelShape, PrefixAdapter, load_adapter
from switchboard.kernels import cpu_step
from switchboard.kernels.backend import default_backend, get_kernels
from switchboard.kernels.cpu_adapters import compiled_adapters_available
from switchboard.kernels.paged_attention import compiled_paged_attention_available

from ..adapters import ServedAdapters, merge_into
from ..config import ServeConfig
from ..models.attention import KVCache
from ..models.config import ModelConfig
from ..models.loader import load_model
from ..models.prepack import prepack_available, prepack_bf16
from ..models.quant import weight_bytes
from ..models.step_ops import compiled_step_ops, compiled_step_ops_apply
from . import isolation
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .guided import GrammarCompiler, GuidedState
from .model_runner import ModelRunner, PromptLogprobSpan, prompt_logprob_spans
from .request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterStats:
    """The device tier, for metrics (read from the step thread's structures without stopping it)."""

    max_resident: int
    resident: int
    loads: int
    hits: int
    evictions: int
    running: list[str]  # adapters of running sequences
    waiting: list[str]  # adapters of waiting sequences


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int


def load_tokenizer(model_dir) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(str(model_dir))  # local files only; never trust_remote_code
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"{model_dir}: a fast (tokenizer.json) tokenizer is required")
    return tok


class LLMEngine:
    def __init__(self, config: ServeConfig, *, detokenize: bool = True) -> None:
        """`detokenize=False`: outputs carry token ids only (`new_text` empty) and stop strings are not checked here;
        the engine core process runs so, leaving text and stop strings to the API process (core_client.py)."""
        self.config = config
        self.detokenize = detokenize
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = config.torch_device
        self.model_config = ModelConfig.from_dir(config.model)
        mc = self.model_config
        limit = mc.max_position_embeddings
        if mc.sliding_window:  # attend fully inside the window: never run past it
            limit = min(limit, mc.sliding_window)
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.model = load_model(
            config.model,
            config.torch_dtype,
            self.device,
            max_positions=self.max_model_len,
            quantize=config.quantize,
            nf4_path=config.nf4_path,
        )
        self.base_weight_bytes = weight_bytes(self.model)  # {"linear", "other", "total"}: start-up line, /metrics
        self.tokenizer = load_tokenizer(config.model)
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        # Structured output: the API compiles requests' grammars with it; their stop tokens are our EOS ids.
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, sorted(self.eos_token_ids))
        kv_dtype = config.torch_kv_cache_dtype
        per_block = KVCache.bytes_per_block(mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, kv_dtype)
        num_blocks = config.num_kv_blocks or max(2, int(config.kv_cache_gb * 2**30) // per_block)
        self.kv_cache = KVCache(
            mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim, kv_dtype, self.device
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.adapters = self._load_adapters(config)
        self.merged_adapter = self._merge(config.merge_adapter)
        if prepack_available(config.torch_dtype, self.device):  # after merging: the packed copies are snapshots
            prepack_bf16(self.model, batch_hint=min(config.max_num_seqs, 32))
        if compiled_step_ops_apply(config.torch_dtype, self.device):
            self.model.ops = compiled_step_ops()
        # Slots exist even without start-up adapters: uploads register adapters while serving.
        self.served_adapters = ServedAdapters(
            self.adapters,
            self.model.linears(),
            config.max_resident_adapters,
            config.torch_dtype,
            self.device,
            get_kernels(default_backend(self.device)),
            code_lora_slots=config.code_lora_slots,
        )
        self.scheduler = Scheduler(
            self.blocks,
            config.max_num_seqs,
            config.max_batch_tokens,
            on_admit=self._acquire_adapter,
            on_release=self.served_adapters.release,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, self.served_adapters)
        if self.device.type == "cpu":
            # Build (or load) the compiled CPU kernels now, not inside the first request (~10 s cold each).
            compiled_paged_attention_available()
            compiled_adapters_available()
            cpu_step.compiled_step_available()
        self._requests: dict[str, list[Sequence]] = {}
        self._failed: list[Sequence] = []  # sequences ended by an error during the current step
        self._failed_admissions: list[tuple[Sequence, str]] = []  # adapters that failed to load in `schedule`
        self._num_preemptions = 0
        self._ids = itertools.count()

    # ---- adapters -------------------------------------------------------------------------------------------
    def _load_adapters(self, config: ServeConfig) -> dict[str, Adapter]:
        """Every `--adapter NAME=DIR`, parsed and validated against the base model; an AdapterError names the flag."""
        adapters = {}
        for name, path in config.adapters.items():
            try:
                adapters[name] = load_adapter(path, self.base_shape, name)
            except AdapterError as exc:
                raise AdapterError(str(exc), f"--adapter {name}={path}") from exc
        return adapters

    @property
    def base_shape(self) -> BaseModelShape:
        """What adapters are validated against (start-up adapters here, uploads in the API)."""
        return self.model_config.base_shape()

    def _merge(self, name: str | None) -> Adapter | None:
        """`--merge-adapter`: fold one start-up adapter into the base weights; the engine then serves it only."""
        if name is None:
            return None
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise ValueError(f"--merge-adapter {name!r} is not one of the --adapter names")
        merge_into(self.model.linears(), adapter)
        return adapter

    def retire_adapter(self, name: str) -> None:
        """An old version or a deleted adapter: running requests finish on it, then it leaves the slots."""
        self.served_adapters.retire(name)

    def registered_adapters(self) -> list[str]:
        return self.served_adapters.registered()

    def _acquire_adapter(self, seq: Sequence) -> bool:
        try:
            return self.served_adapters.acquire(seq)
        except Exception as exc:  # this adapter cannot be loaded: its sequence fails after `schedule`, not the step
            log.exception("loading adapter %s into a device slot failed", seq.adapter_id)
            self._failed_admissions.append((seq, f"internal error loading adapter {seq.adapter_id!r}: {exc}"))
            return False

    def _write_prefix(self, seq: Sequence) -> None:
        """Write a newly admitted prefix sequence's virtual keys and values into its first cache positions."""
        if seq.prefix_len == 0 or seq.prefix_written:
            return
        slots = torch.tensor([self.blocks.slot(seq, p) for p in range(seq.prefix_len)], device=self.device)
        self.served_adapters.write_prefix(seq, self.kv_cache.data, slots)
        seq.prefix_written = True

    # ---- requests -------------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        adapter: Adapter | None = None,
        tenant: str = "",
    ) -> None:
        """Queue a request. `adapter`: the parsed adapter named `adapter_id` when the engine may not hold it (uploads;
        its sequences carry it to admission); `tenant` groups requests for fair admission."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; the context window is {self.max_model_len}"
            )
        served, prefix_len = None, 0
        if adapter_id is not None and (self.merged_adapter is None or adapter_id != self.merged_adapter.name):
            served = self.served_adapters.resolve(adapter_id, adapter)
            if isinstance(served, PrefixAdapter):
                prefix_len = served.num_virtual_tokens
        if prefix_len + len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens and the adapter {prefix_len} virtual tokens; "
                f"the context window is {self.max_model_len}"
            )
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None and not params.greedy:
                # On the logits' device: torch.multinomial refuses a CPU generator for CUDA probabilities.
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            seqs.append(
                Sequence(
                    request_id=request_id,
                    index=index,
                    prompt_token_ids=list(prompt_token_ids),
                    params=params,
                    detokenizer=IncrementalDetokenizer(
                        self.tokenizer.backend_tokenizer,
                        prompt_token_ids,
                        params.stop,
                        include_stop=params.include_stop_str_in_output,
                        skip_special_tokens=params.skip_special_tokens,
                    )
                    if self.detokenize
                    else None,
                    adapter_id=adapter_id,
                    adapter=served,
                    adapter_kind=None if served is None else served.kind,
                    prefix_len=prefix_len,
                    generator=generator,
                    guided=None if params.guided is None else GuidedState(params.guided),
                    tenant=tenant,
                    prompt_logprobs=None if params.prompt_logprobs is None else [None],
                )
            )
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Cancel every choice of a request (or choice `index` alone: its stop string was found by the API process)
        and free their blocks (a client went away)."""
        if index is None:
            seqs = self._requests.pop(request_id, [])
        else:
            seqs = [s for s in self._requests.get(request_id, []) if s.index == index]
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
        if index is not None and all(s.is_finished for s in self._requests.get(request_id, [])):
            self._requests.pop(request_id, None)

    def request_ids(self) -> list[str]:
        """Requests with a choice not yet reported finished."""
        return list(self._requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=self.blocks.num_blocks,
            num_free_kv_blocks=self.blocks.num_free,
            num_preemptions=self._num_preemptions,
        )

    def adapter_stats(self) -> AdapterStats:
        """The device tier and the adapters of running and waiting sequences (safe to call from another thread:
        it copies the scheduler's queues before reading them)."""
        slots = self.served_adapters.stats()
        return AdapterStats(
            max_resident=slots.max_resident,
            resident=slots.resident,
            loads=slots.loads,
            hits=slots.hits,
            evictions=slots.evictions,
            running=sorted({s.adapter_id for s in list(self.scheduler.running) if s.adapter_id is not None}),
            waiting=sorted({s.adapter_id for s in list(self.scheduler.waiting) if s.adapter_id is not None}),
        )

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, write prefixes, run the model, sample, post-process. Each per-sequence stage isolates its
        failures: a sequence whose stage fails ends alone with FinishReason.ERROR and the others go on as if it had
        not been there (isolation.py). Only a failure that no single sequence explains is raised: the engine's."""
        self._failed = []
        plan = self.scheduler.schedule()
        for seq, message in self._failed_admissions:
            self._fail(seq, message)
        self._failed_admissions = []
        self._num_preemptions += plan.num_preempted
        updated: list[Sequence] = list(plan.finished)
        what = "writing its prefix adapter's keys and values"
        for s in plan.scheduled:  # every scheduled sequence: a 1-token prompt is scheduled as a decode
            isolation.guard(self._fail, s.seq, what, self._write_prefix, s.seq)
        plan = isolation.running(plan)
        if plan.scheduled:
            plan, logits = isolation.forward(self.runner.run, plan, self._fail)
            sampling = [s.seq for s in plan.scheduled if s.samples]
            self._record_prompt_logprobs(prompt_logprob_spans(plan), logits[len(sampling) :])
            logits = logits[: len(sampling)]
            for s in plan.scheduled:
                s.seq.num_computed += s.num_tokens
            tokens, logprobs = isolation.sample(logits, sampling, self._fail, self.eos_token_ids)
            for seq, token, lp in zip(sampling, tokens, logprobs, strict=True):
                if token is None:
                    if not seq.is_finished:  # else a sampling error ended it already
                        self._fail(seq, "the model's output for this request is not finite (NaN or infinity)")
                elif isolation.guard(self._fail, seq, "processing its new token", self._append, seq, token, lp):
                    updated.append(seq)
        return [self._output(seq) for seq in updated + self._failed]

    # ---- failure isolation ----------------------------------------------------------------------------------
    def _fail(self, seq: Sequence, message: str) -> None:
        """End one sequence with an error; its blocks and adapter slot are freed, the batch goes on without it."""
        log.warning("request %s (choice %d) failed: %s", seq.request_id, seq.index, message)
        seq.error = message
        self.scheduler.finish(seq, FinishReason.ERROR)
        self._failed.append(seq)

    def _append(self, seq: Sequence, token: int, lp) -> None:
        seq.output_token_ids.append(token)
        seq.pending_token_ids.append(token)
        if lp is not None:
            seq.pending_logprobs.append(lp)
        p = seq.params
        reason = None
        # the grammar ended (even under ignore_eos): its matcher advances with every token, so it is asked first
        if (seq.guided is not None and seq.guided.advance(token)) or self._stops(seq, token):
            reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= p.max_tokens or seq.cache_len(seq.num_tokens) >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _record_prompt_logprobs(self, spans: list[PromptLogprobSpan], logits: torch.Tensor) -> None:
        """Each span's prompt tokens' logprobs (and the top k) from its rows of `logits` [sum of counts, V]."""
        row = 0
        for span in spans:
            seq = span.seq
            assert seq.prompt_logprobs is not None and seq.params.prompt_logprobs is not None
            lp = torch.log_softmax(logits[row : row + span.count].float(), dim=-1)
            row += span.count
            targets = seq.prompt_token_ids[span.start + 1 : span.start + 1 + span.count]
            chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
            k = min(seq.params.prompt_logprobs, lp.shape[-1])
            top = torch.topk(lp, k) if k else None
            ids, values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
            for j, token in enumerate(targets):
                alternatives = list(zip(ids[j], values[j], strict=True)) if top is not None else []
                seq.prompt_logprobs.append(TokenLogprob(token_id=token, logprob=chosen[j], top=alternatives))

    def _stops(self, seq: Sequence, token: int) -> bool:
        """Whether `token` ends the sequence (a stop token, EOS, or a stop string in its text); adds its text. Before
        `min_tokens` tokens nothing stops it (vLLM); a stop token's text is kept with include_stop_str_in_output."""
        p = seq.params
        check = len(seq.output_token_ids) >= p.min_tokens
        if check and (token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos)):
            if p.include_stop_str_in_output and seq.detokenizer is not None:
                seq.detokenizer.add(token, check_stop=False)
            return True
        # Without a detokenizer (the engine core process) the API process looks for stop strings (output_processor.py)
        return seq.detokenizer is not None and seq.detokenizer.add(token, check_stop=check) is not None

    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.status is SequenceStatus.FINISHED
        out = RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_text="" if seq.detokenizer is None else seq.detokenizer.take(final=finished),
            new_token_ids=seq.pending_token_ids,
            logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_token_ids),
            completion_tokens=len(seq.output_token_ids),
            error=seq.error,
        )
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True
        seq.pending_token_ids, seq.pending_logprobs = [], []
        if finished:
            seqs = self._requests.get(seq.request_id, [])
            if all(s.is_finished for s in seqs):
                self._requests.pop(seq.request_id, None)
        return out

    # ---- convenience for tests and benchmarks ---------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter_ids: list[str | None] | None = None,
    ) -> list[list[int]]:
        """Run prompts to completion (all admitted at once, continuously batched); token ids per prompt."""
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        adapter_ids = adapter_ids or [None] * len(prompts)
        for rid, prompt, adapter_id in zip(ids, prompts, adapter_ids, strict=True):
            self.add_request(rid, prompt, params, adapter_id)
        result: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.index == 0:
                    result[out.request_id].extend(out.new_token_ids)
        return [result[rid] for rid in ids]

    def prompt_logits(self, prompt_token_ids: list[int], adapter_id: str | None = None) -> torch.Tensor:
        """Logits at every prompt position through the serving path (one prefill step, adapters applied): what
        parity checks against a reference model compare. The engine must be idle and the prompt fit one step."""
        rid = f"probe-{next(self._ids)}"
        self.add_request(rid, prompt_token_ids, SamplingParams(max_tokens=1, temperature=0.0), adapter_id)
        try:
            plan = self.scheduler.schedule()
            for s in plan.prefills:
                self._write_prefix(s.seq)
            ids, positions, meta, _ = self.runner.prepare(plan)
            with torch.inference_mode():
                hidden = self.model(
                    ids, positions, self.kv_cache.data, meta, self.served_adapters.batch(plan.scheduled)
                )
                return self.model.logits(hidden)
        finally:
            self.abort_request(rid)

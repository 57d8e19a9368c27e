"""The OpenAI-compatible HTTP app: `create_app(engine, config)` wires routes, error handlers and metrics.

A generation request goes: read, parse and validate the body (body, schemas) -> resolve `model`/`adapter_id`
(resolve) -> token ids and budget (prompts) -> SamplingParams -> admit the engine requests (generation; 429 when the
queue is full) -> stream SSE chunks (streaming) or collect one response (responses). Parsing, validation, chat
templates and tokenization run in the request worker (body), never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from transformers import PreTrainedTokenizerBase

from switchboard.adapters_store.kinds import BaseModelShape
from switchboard.adapters_store.store import AdapterStore
from switchboard.serving.adapters.host_cache import HostCache
from switchboard.serving.adapters.metrics import DeviceStats
from switchboard.serving.api.adapter_registry import AdapterRegistry
from switchboard.serving.api.adapter_routes import adapter_router
from switchboard.serving.api.auth import Authenticator, Tenant, read_api_keys
from switchboard.serving.api.body import RequestWorker, json_body_route
from switchboard.serving.api.errors import SERVER_ERROR, ApiError, bad_request, check_text, install_error_handlers
from switchboard.serving.api.generation import ClientDisconnected, Generation, unless_disconnected
from switchboard.serving.api.openapi import (
    GENERATION_RESPONSES,
    HEALTH_ERRORS,
    LIST_ERRORS,
    METRICS_ERRORS,
    install_openapi,
)
from switchboard.serving.api.prompts import Budget, chat_prompt, completion_prompts, prompt_batch
from switchboard.serving.api.resolve import ResolvedModel, model_cards, resolve_model
from switchboard.serving.api.responses import (
    ChatFormat,
    ChoiceState,
    CompletionFormat,
    ResponseFormat,
    TokenTexts,
    echo_prompts,
    usage,
)
from switchboard.serving.api.sampling import vllm_fields
from switchboard.serving.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from switchboard.serving.api.streaming import EventStreamResponse, stream_events
from switchboard.serving.config import ServeConfig
from switchboard.serving.engine import openmp
from switchboard.serving.engine.core_client import HostTier
from switchboard.serving.engine.guided import Grammar, GrammarCompiler, GuidedError
from switchboard.serving.engine.request import AdapterInput, RequestOutput, SamplingParams
from switchboard.serving.metrics import CONTENT_TYPE, GenerationTimer, RequestCounter, ServerMetrics, StatsSource

# Status for a client that went away before its (non-streamed) response was ready; nobody reads it, the metrics do.
CLIENT_CLOSED_REQUEST = 499
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat's default: the rest of the context)


class Engine(Protocol):
    """What the API needs of an engine (`serving/backends.py`: `AsyncEngine`, or vLLM's behind `VllmEngine`)."""

    tokenizer: PreTrainedTokenizerBase
    model_name: str
    max_model_len: int
    adapter_kinds: dict[str, str]  # adapter id -> kind, every adapter requests may name
    merged_adapter: str | None  # the adapter folded into the weights (then the base model is not served)
    base_shape: BaseModelShape  # what uploads are validated against
    base_weight_bytes: dict[str, int]  # {"linear", "other", "total"}: the base model's weights as held (NF4 or dense)
    grammars: GrammarCompiler | None  # structured output's grammars for this model's tokenizer (None: not offered)
    adapter_input: AdapterInput  # what `generate(adapter=...)` takes for an uploaded version
    host_tier: HostTier | None  # the engine's own host cache (the engine core process's); None: the API's

    def start(self) -> None: ...

    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]: ...

    def stats(self) -> StatsSource: ...

    def retire_adapter(self, adapter_id: str) -> None: ...

    def refuses_kind(self, kind: str) -> str | None: ...

    def adapter_stats(self) -> DeviceStats: ...


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    metrics = ServerMetrics(
        engine.stats,
        per_adapter=config.metrics_per_adapter,
        model_name=engine.model_name,
        max_model_len=engine.max_model_len,
    )
    metrics.base_weights(engine.base_weight_bytes, config.quantize)
    texts = TokenTexts(engine.tokenizer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        # asyncio.to_thread's pool (adapter uploads): torch on one thread there, like the pools below (openmp.py)
        io_pool = openmp.serial_pool("switchboard-io", max_workers=None)
        asyncio.get_running_loop().set_default_executor(io_pool)
        # What start-up allocated (the model, torch, transformers: some 450k objects) leaves the garbage collector's
        # view: a full collection walked it all, holding the GIL for tenths of a second on the demo model, whenever
        # requests had allocated enough (a body of many items triggers one at once). vLLM freezes its heap likewise.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # let the interpreter's last collection see those objects again
            engine.shutdown()
            parser.shutdown(wait=False)
            grammar_pool.shutdown(wait=False, cancel_futures=True)
            io_pool.shutdown(wait=False)
            worker.shutdown()

    worker = RequestWorker()
    app = FastAPI(title="Switchboard", lifespan=lifespan)
    app.router.route_class = json_body_route(config.max_request_bytes, worker)
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=metrics)
    authenticate = Authenticator(read_api_keys(config.api_keys) if config.api_keys is not None else None)
    install_openapi(app, bearer=authenticate.multi_tenant)
    host = HostCache(config.max_host_adapters, on_load=metrics.adapter_load_seconds.observe)
    store = AdapterStore(config.store)
    registry = AdapterRegistry(
        config, store, engine.adapter_kinds, engine.base_shape, host, engine.retire_adapter, engine.refuses_kind
    )
    adapter_input = {AdapterInput.PARSED: registry.parsed, AdapterInput.DIRECTORY: registry.directory}[
        engine.adapter_input
    ]
    if engine.host_tier is not None:  # the engine parses uploads into its own host cache: its parse times count
        engine.host_tier.on_load = metrics.adapter_load_seconds.observe
    metrics.watch_adapters(engine.adapter_stats, host if engine.host_tier is None else engine.host_tier, store)
    # One parsing thread: parses are short (2 ms alone) and rare next to steps; asyncio's default pool ran several at
    # once against the step thread for the GIL and the two cores (median parse 17 ms under load, 5 ms with one).
    parser = openmp.serial_pool("switchboard-parse")
    # Structured output's grammars compile here (milliseconds to a second; cached by spec), off the event loop and
    # out of the request worker's lanes, so that a big schema never holds up other requests' tokenization.
    grammar_pool = openmp.serial_pool("switchboard-grammar")
    app.state.adapters = registry
    app.include_router(adapter_router(registry, authenticate, config.max_adapter_bytes, app.router.route_class))

    def resolve(body: SamplingFields, tenant: Tenant) -> ResolvedModel:
        check_text(body.user or "", param="user")
        return resolve_model(
            body.model,
            body.adapter_id,
            base_model=engine.model_name,
            adapter_exists=lambda adapter_id: registry.lookup(tenant, adapter_id) is not None,
            merged_adapter=engine.merged_adapter,
        )

    async def serve(
        request: Request,
        body: SamplingFields,
        fmt: ResponseFormat,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        resolved: ResolvedModel,
        timer: GenerationTimer,
        tenant: Tenant,
    ) -> Response:
        request_id = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
        params.guided = await compile_guided(body)
        engine_adapter, adapter = None, None
        if resolved.adapter_id is not None:
            ref = registry.require_servable(tenant, resolved.adapter_id)
            engine_adapter = ref.key
            timer.adapter = ref.key if ref.stored is None else f"{ref.stored.owner}/{ref.id}"
            if ref.stored is not None:  # disk -> host tier (or the version's directory) in a worker thread
                adapter = await asyncio.get_running_loop().run_in_executor(parser, adapter_input, ref)
        generate = functools.partial(engine.generate, adapter=adapter, tenant=tenant.name)
        generation = Generation(generate, request_id, prompts, params, engine_adapter, timer)
        try:
            await unless_disconnected(request, generation.start())
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        header = {"id": request_id, "object": fmt.object, "created": int(time.time()), "model": resolved.name}
        if body.stream:
            endpoint = request.scope["route"].path

            def on_error(error: ApiError) -> None:
                metrics.stream_errors.labels(endpoint=endpoint, status=str(error.status)).inc()

            events = stream_events(generation, fmt, texts, header, body.include_usage, on_error)
            return EventStreamResponse(events, on_close=generation.aclose)
        try:
            states = await unless_disconnected(request, _collect(generation, fmt, texts))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            await generation.aclose()
        completion_tokens = sum(state.completion_tokens for state in states)
        return JSONResponse(
            {
                **header,
                "choices": [fmt.choice(i, state) for i, state in enumerate(states)],
                "usage": usage(generation.prompt_tokens, completion_tokens),
            }
        )

    async def compile_guided(body: SamplingFields) -> Grammar | None:
        """The compiled grammar of the request's structured-output field, if any; 400 if it does not compile."""
        asked = body.guided_spec()
        if asked is None:
            return None
        param, spec = asked
        if engine.grammars is None:
            raise bad_request(f"`{param}`: structured output is not available with --backend vllm", param=param)
        try:
            return await asyncio.get_running_loop().run_in_executor(grammar_pool, engine.grammars.compile, spec)
        except GuidedError as exc:
            raise bad_request(f"Invalid `{param}`: {exc}", param=param) from exc

    def completion_inputs(body: CompletionRequest, max_tokens: int) -> tuple[list[list[int]], dict[str, Any]]:
        """The prompts' token ids, each checked against the context, and vLLM's sampling fields (in the request
        worker)."""
        budget = Budget(max_tokens, engine.max_model_len, what="prompt")
        return completion_prompts(body.prompt, engine.tokenizer, budget), vllm_fields(body, engine.tokenizer)

    def chat_inputs(body: ChatCompletionRequest) -> tuple[list[int], int, dict[str, Any]]:
        """The rendered conversation's token ids, the completion's budget and vLLM's sampling fields (in the request
        worker)."""
        budget = Budget(body.requested_max_tokens(), engine.max_model_len, what="messages")
        prompt = chat_prompt(body.messages, engine.tokenizer, budget)
        return prompt, budget.completion_tokens(len(prompt)), vllm_fields(body, engine.tokenizer)

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        tenant = authenticate(request)
        timer = metrics.timer()
        _refuse_unsupported(body)
        resolved = resolve(body, tenant)
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        num_prompts = len(prompt_batch(body.prompt))
        if num_prompts * body.n > config.max_waiting:  # it could never be queued whole: refused before tokenizing
            raise bad_request(
                f"The request asks for {num_prompts * body.n} choices ({num_prompts} prompts x n={body.n}); this "
                f"server queues at most {config.max_waiting} (--max-waiting).",
                param="prompt",
            )
        prompts, vllm = await worker.run(len(await request.body()), completion_inputs, body, max_tokens)
        params = _sampling_params(
            body, max_tokens=max_tokens, logprobs=body.logprobs, vllm=vllm, prompt_logprobs=body.prompt_logprobs_k()
        )
        echo = echo_prompts(body.prompt, prompts, engine.tokenizer, body.n) if body.echo else None
        fmt = CompletionFormat(texts, wants_logprobs=body.logprobs is not None, echo=echo)
        return await serve(request, body, fmt, prompts, params, resolved, timer, tenant)

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        tenant = authenticate(request)
        timer = metrics.timer()
        _refuse_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("`top_logprobs` requires `logprobs` to be true.", param="top_logprobs")
        resolved = resolve(body, tenant)
        prompt, max_tokens, vllm = await worker.run(len(await request.body()), chat_inputs, body)
        params = _sampling_params(body, max_tokens=max_tokens, logprobs=body.num_logprobs(), vllm=vllm)
        fmt = ChatFormat(texts, wants_logprobs=body.logprobs)
        return await serve(request, body, fmt, [prompt], params, resolved, timer, tenant)

    @app.get("/v1/models", responses=LIST_ERRORS)
    async def list_models(request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        adapters = {ref.id: ref.kind for ref in registry.visible(tenant)}
        return {"object": "list", "data": model_cards(engine.model_name, engine.max_model_len, created, adapters)}

    @app.get("/health", responses=HEALTH_ERRORS)
    async def health() -> Response:
        if not engine.is_alive():  # the engine core process died: requests answer 503 until a restart
            error = ApiError(503, "The engine is not running.", type=SERVER_ERROR, code="engine_unavailable")
            return error.response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse, responses=METRICS_ERRORS)
    async def prometheus_metrics(request: Request) -> Response:
        if not authenticate(request).admin:  # with --api-keys: 401 without a key, 403 for a tenant's key
            raise ApiError(
                403, "Only an admin key may read /metrics.", type="permission_error", code="permission_denied"
            )
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _collect(generation: Generation, fmt: ResponseFormat, texts: TokenTexts) -> list[ChoiceState]:
    states = [fmt.new_state(i) for i in range(generation.num_choices)]
    async with aclosing(generation.outputs()) as outputs:
        async for item in outputs:
            states[item.choice].update(item.output, texts)
    return states


def _refuse_unsupported(body: SamplingFields) -> None:
    unsupported = body.unsupported_fields()
    if unsupported:
        reasons = " ".join(f"`{name}` is not supported: {body.REASONS[name]}." for name in unsupported)
        raise bad_request(f"{reasons} Leave it unset.", param=unsupported[0])


def _sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    vllm: dict[str, Any],
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """`vllm`: vLLM's sampling fields, checked against the tokenizer (sampling.vllm_fields)."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),  # vLLM's -1 and our 0 both mean "off"
            seed=body.seed,
            stop=body.stop_list(),
            stop_token_ids=list(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            n=body.n,
            prompt_logprobs=prompt_logprobs,
            **vllm,
        )
    except ValueError as exc:  # the message starts with the field's name
        field = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=field if field in type(body).model_fields else None) from exc

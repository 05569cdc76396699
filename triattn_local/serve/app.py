"""The HTTP routes: OpenAI chat and text completions, model discovery, health, props and metrics. Handlers validate
and render the prompt, hand a Job to the scheduler (scheduler.py) and answer with what its Run yields
(generation.py, responses.py); nothing here touches the model."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ..errors import UserError
from ..sampling import SamplingParams
from . import errors
from .chat_format import OutputParser, Prompt, active_tools, encode_text, is_reasoning_model, render_chat
from .conversations import SnapshotStore
from .errors import APIError
from .generation import Run
from .limits import LOOPBACK_HOSTS, BodyBudget, HostCheck, PromptLimits, busy_error
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import chat_response, completion_response, sse, stream_chat, stream_completion, whole
from ..continuous import ContinuousBatch
from .scheduler import BatchedScheduler, Job, Scheduler


@dataclass
class ServeOptions:
    served_name: str
    api_key: str | None = None
    max_tokens: int | None = None  # server-side cap on every request's output
    temperature: float = 0.6  # defaults when a request does not say
    top_p: float = 0.95
    parallel: int = 8
    kv_memory: int | None = None  # bytes for the batched KV cache (None: 85 % of the free GPU memory)
    max_conversations: int = 64  # cache snapshots kept for prefix reuse
    conversation_bytes: int = 4 << 30
    max_waiting: int | None = 16  # requests waiting for a generation slot before 429 (None: no bound)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # Host header names served (None: any)


class ServerState:
    """What the routes share: the engine once loaded (None while loading), the scheduler, kept cache snapshots and
    metrics."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.engine = None
        self.settings = None
        self.scheduler: Scheduler | None = None
        self.store = SnapshotStore(options.max_conversations, options.conversation_bytes)
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.created = int(time.time())
        self.reasoning = False
        self.limits: PromptLimits | None = None

    def attach(self, engine, settings) -> None:
        """Called by the loader thread once the model is in memory."""
        self.engine, self.settings = engine, settings
        self.reasoning = is_reasoning_model(engine.tokenizer)
        self.limits = PromptLimits(engine.tokenizer, engine.context_length)
        batch = ContinuousBatch.create(engine, settings, self.options.parallel, self.options.kv_memory,
                                       reserve=self.options.conversation_bytes)  # the snapshots live there too
        if batch is not None:  # the torch static path (CUDA): every decoding request in one batched step
            self.scheduler = BatchedScheduler(engine, settings, self.store, batch, self.options.parallel,
                                              self.options.max_waiting)
        else:
            self.scheduler = Scheduler(engine, settings, self.store, self.options.parallel, self.options.max_waiting)
        self.scheduler.start()
        self.ready.set()

    def require_ready(self):
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
        return self.engine

    def model_ids(self) -> set[str]:
        ids = {self.options.served_name}
        if self.engine is not None:
            ids.add(str(self.engine.model_id))
        return ids


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="triattn serve", version="1", docs_url=None, redoc_url=None)
    errors.install(app, state.options.api_key)
    app.add_middleware(BodyBudget)  # outside the body limit: a body waits for its share before it is read
    if state.options.allowed_hosts is not None:  # outside the body limit and the key check: refused first
        app.add_middleware(HostCheck, allowed=state.options.allowed_hosts)

    app.add_middleware(CountRequests, metrics=state.metrics)  # outermost: counts 401 and 413 answers too

    @app.get("/health")
    async def health():
        if state.ready.is_set():
            return {"status": "ok"}
        return JSONResponse({"status": "loading"}, status_code=503)

    def model_card(engine) -> dict:
        return {"id": state.options.served_name, "object": "model", "created": state.created, "owned_by": "triattn",
                "context_length": engine.context_length, "max_model_len": engine.context_length,
                "meta": {"n_ctx_train": engine.context_length, "kv_budget": _budget(state)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(state.require_ready())]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        engine = state.require_ready()
        _check_model(state, model_id)
        return model_card(engine)

    @app.get("/props")
    async def props():
        engine = state.require_ready()
        policy = state.settings.policy
        return {
            "default_generation_settings": {"n_ctx": engine.context_length, "params": {
                "temperature": state.options.temperature, "top_p": state.options.top_p,
                "max_tokens": state.options.max_tokens}},
            "model_alias": state.options.served_name,
            "model_path": str(engine.model_path),
            "total_slots": state.scheduler.parallel,
            "triattn": {
                "method": state.settings.method if policy else "full",
                "budget": policy.budget if policy else None,
                "divide_length": policy.divide_length if policy else None,
                "window": policy.window if policy else None,
                "reasoning": state.reasoning,  # <think> in the vocabulary: chat_template_kwargs.enable_thinking works
                "api_key": state.options.api_key is not None,
                "max_tokens": state.options.max_tokens,
                "kv_bytes_per_token": engine.kv_bytes_per_token,
            },
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        state.require_ready()
        running, waiting = state.scheduler.counts()
        sessions = state.scheduler.sessions() + state.store.snapshots()
        text = state.metrics.render(sessions, running, waiting, len(state.store), _rss())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = state.require_ready()
        _check_model(state, body.model)
        await state.limits.check(_chat_texts(body), "messages")  # an oversized prompt is never tokenised whole
        prompt: Prompt = await asyncio.to_thread(render_chat, engine.tokenizer, body)
        requested = body.max_completion_tokens or body.max_tokens
        params = _sampling(state, body, len(prompt.ids), requested, "messages")
        if prompt.suppress:
            params = replace(params, suppress=prompt.suppress)
        tools = active_tools(body)
        job = _admit(state, Job(prompt.ids, params, True, asyncio.get_running_loop()))
        parser = OutputParser(parse_tools=bool(tools), starts_in_reasoning=prompt.starts_in_reasoning)
        run = Run(state, job, parser)
        meta = _meta(state, "chatcmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(stream_chat(run, meta, include_usage))
        return await whole(request, run, lambda deltas, summary: chat_response(meta, deltas, summary, parser))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = state.require_ready()
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            await state.limits.check([body.prompt], "prompt")
            ids = await asyncio.to_thread(encode_text, engine.tokenizer, body.prompt)
        else:
            tokenizer = engine.tokenizer
            vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
            if max(body.prompt) >= vocab:
                raise APIError(400, f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
            ids = list(body.prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        params = _sampling(state, body, len(ids), body.max_tokens, "prompt")
        job = _admit(state, Job(ids, params, False, asyncio.get_running_loop()))
        run = Run(state, job, None)
        meta = _meta(state, "cmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(stream_completion(run, meta, include_usage))
        return await whole(request, run, lambda texts, summary: completion_response(meta, texts, summary))

    return app


# ---- request → job ---------------------------------------------------------------------------------------------


def _chat_texts(body: ChatCompletionRequest) -> list[str]:
    """The text of a chat request that ends up in the prompt: contents, reasoning, tool call arguments."""
    texts = []
    for m in body.messages:
        texts += [m.text(), m.reasoning_content or "", m.reasoning or ""]
        for call in m.tool_calls or []:
            if isinstance(call.function.arguments, str):
                texts.append(call.function.arguments)
    return [t for t in texts if t]


def _admit(state: ServerState, job: Job) -> Job:
    """A place in the wait line, or 429 when it is full."""
    if not state.scheduler.admit(job):
        raise busy_error(*state.scheduler.counts())
    return job


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.model_ids():
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.options.served_name}'",
                       param="model", code="model_not_found")


def _sampling(state: ServerState, body, prompt_tokens: int, requested: int | None, what: str) -> SamplingParams:
    """Sampling parameters, with max_tokens clamped to the room left in the context (and the server's cap). A prompt
    that leaves no room is the error OpenAI clients compact on."""
    context = state.engine.context_length
    if prompt_tokens >= context:
        asked = prompt_tokens + (requested or 0)
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{asked} tokens ({prompt_tokens} in the {what}, {requested or 0} in the completion). "
                            f"Please reduce the length of the {what}.",
                       param=what, code="context_length_exceeded")
    room = context - prompt_tokens
    max_tokens = min(requested or room, room, state.options.max_tokens or room)
    temperature = state.options.temperature if body.temperature is None else body.temperature
    top_p = state.options.top_p if body.top_p is None else body.top_p
    if top_p == 0 or temperature < 1e-3:  # a nucleus of one token, or a temperature too small to divide by
        temperature, top_p = 0.0, 1.0
    seed = None if body.seed is None else body.seed % (1 << 63)
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop=body.stop_list())
    except UserError as e:
        raise APIError(400, str(e)) from None


def _meta(state: ServerState, prefix: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.options.served_name}


# ---- small helpers ---------------------------------------------------------------------------------------------


def _budget(state: ServerState) -> int | None:
    policy = state.settings.policy if state.settings else None
    return policy.budget if policy else None


class CountRequests:
    """Counts answers by endpoint and status (pure ASGI, so streaming and disconnects pass through untouched)."""

    KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/props", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope.get("path") if scope.get("path") in self.KNOWN else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _rss() -> int:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss
    except Exception:
        return 0

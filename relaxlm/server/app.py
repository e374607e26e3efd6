"""The OpenAI-compatible HTTP server: FastAPI routes over completions.py's functions.

    app = create_app(relaxlm.LLM("artifacts/x"), ServerOptions(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=1234)

Errors always come back in OpenAI's shape ({"error": {...}}) with a 4xx status: bad fields
400 (naming the field), unknown model 404, missing or wrong API key 401, overload 429; a body
too large 413, and on loopback a foreign Host 421 or Origin 403 (guards.py, before any route).
Streams are Server-Sent Events ending with `data: [DONE]`; a client that disconnects mid-stream
cancels its request, which frees its KV pages at once.
"""

import asyncio
import base64
import functools
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from relaxlm.errors import RelaxlmError, Unavailable
from relaxlm.runtime.vision import ImagePrompt
from relaxlm.server import schemas as s
from relaxlm.server.audio import add_audio_routes
from relaxlm.server.completions import (
    ApiError,
    Chat,
    ModelContext,
    chat_completion,
    chat_prompt_ids,
    text_completion,
)
from relaxlm.server.guards import DEFAULT_MAX_BODY_BYTES, RequestGuard, is_loopback
from relaxlm.server.metrics import CONTENT_TYPE, ServerMetrics
from relaxlm.server.speech import add_speech_route

logger = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25  # how often a long non-streamed request checks for its client

# Routes open without the API key: the liveness probe, and the chat page (which asks for the
# key itself). /metrics too with ServerOptions.open_metrics.
_OPEN_PATHS = ("/health",)
_OPEN_PREFIXES = ("/ui/",)


@dataclass
class ServerOptions:
    """How `create_app` serves a model.

    served_model_name: the model id clients send (and /v1/models lists); the artifact folder's
        name by default.
    api_key: when set, every route but /health and /ui (and /metrics with open_metrics) needs
        `Authorization: Bearer <api_key>`.
    open_metrics: leave /metrics open when api_key is set (for a scraper without the key).
    max_waiting: sequences queued for a batch slot beyond which requests get a 429.
    mcp: serve the model as an MCP server at /mcp (streamable HTTP; see mcp_server.py).
    ui: serve the web chat page at /ui.
    mcp_config: JSON file of MCP servers whose tools the model may call (see mcp_client.py).
    max_tool_rounds: rounds of MCP tool calls per chat request before the answer is returned.
    host: the address served on; on loopback every route refuses other Host headers and
        foreign Origins (DNS rebinding).
    max_body_bytes: larger request bodies get a 413 before they are read.
    """

    served_model_name: str | None = None
    api_key: str | None = None
    max_waiting: int = 256
    mcp: bool = False
    ui: bool = False
    mcp_config: str | None = None
    max_tool_rounds: int = 4
    host: str = "127.0.0.1"
    open_metrics: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


# A streamed answer: before OpenAPI 3.2 (FastAPI writes 3.1), a text/event-stream schema
# describes one event as SSE clients parse it.
_STREAM = {"content": {"text/event-stream": {"schema": s.SSE_EVENT}}}


def create_app(llm, options: ServerOptions | None = None) -> FastAPI:
    """A FastAPI app serving `llm` (a relaxlm.LLM, AsyncLLM or EmbeddingLLM) with the OpenAI
    API; see the module doc."""
    options = options or ServerOptions()
    name = options.served_model_name or Path(llm.artifact).name
    ctx = ModelContext.serving(llm, name, options.max_waiting)
    metrics = ServerMetrics(
        lambda: (
            None if ctx.is_embedding or ctx.is_speech or ctx.is_synthesizer else ctx.llm.metrics()
        )
    )
    chat: Chat = functools.partial(chat_completion, ctx)
    tools = mcp_server = None
    if options.mcp or options.mcp_config:  # MCP (mcp_client.py, mcp_server.py): SDK on demand
        from relaxlm.server.mcp_client import McpTools, ToolLoop, load_config
        from relaxlm.server.mcp_server import McpModelServer

        if options.mcp_config:  # the model may call the configured servers' tools
            tools = McpTools(load_config(options.mcp_config))
            chat = ToolLoop(chat, tools, options.max_tool_rounds)
        if options.mcp:  # the model as an MCP server at /mcp; its `chat` is the chat route's
            mcp_server = McpModelServer(ctx, chat)
    app = FastAPI(
        title="relaxlm",
        summary="OpenAI-compatible API over an ahead-of-time compiled model",
        version="0.1.0",
        lifespan=functools.partial(_lifespan, tools=tools, mcp_server=mcp_server),
        # Swagger UI and ReDoc load their scripts from a CDN; /openapi.json is the document.
        docs_url=None,
        redoc_url=None,
    )
    _install_errors(app)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=options.max_body_bytes,
        loopback_only=is_loopback(options.host),
    )
    open_paths = _OPEN_PATHS + (("/metrics",) if options.open_metrics else ())
    app.add_middleware(
        _AuthAndCount,
        api_key=options.api_key,
        open_paths=open_paths,
        metrics=metrics,
        router=app.router,
    )
    _add_openai_routes(app, ctx, chat)
    add_audio_routes(app, ctx)
    add_speech_route(app, ctx)
    _add_service_routes(app, ctx, metrics)
    if mcp_server is not None:
        app.router.routes.extend(mcp_server.http_routes())
    if options.ui:
        app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "ui", html=True), "ui")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI, tools, mcp_server) -> AsyncIterator[None]:
    """Open the MCP tool servers' sessions and run /mcp's session manager while serving."""
    async with AsyncExitStack() as stack:
        if tools is not None:
            await tools.connect(stack)
        if mcp_server is not None:
            await stack.enter_async_context(mcp_server.sessions())
        yield


# -- routes -------------------------------------------------------------------------------------


def _add_openai_routes(app: FastAPI, ctx: ModelContext, chat: Chat) -> None:
    """The /v1 routes; `chat` answers /v1/chat/completions (the MCP tool loop, or plainly)."""

    @app.post(
        "/v1/chat/completions",
        response_model=s.ChatCompletionResponse,
        responses={
            **s.GENERATION_ERRORS,
            200: _STREAM,
        },
    )
    async def chat_completions(body: s.ChatCompletionRequest, request: Request):
        return _answer(await _unless_client_leaves(request, chat(body)))

    @app.post(
        "/v1/completions",
        response_model=s.CompletionResponse,
        responses={
            **s.GENERATION_ERRORS,
            200: _STREAM,
        },
    )
    async def completions(body: s.CompletionRequest, request: Request):
        return _answer(await _unless_client_leaves(request, text_completion(ctx, body)))

    def card() -> s.ModelCard:
        window = None if ctx.is_embedding else ctx.context_window
        return s.ModelCard(id=ctx.name, created=ctx.created, max_model_len=window)

    def lora_card(name: str) -> s.ModelCard:
        root = str(ctx.loras()[name].path)
        return card().model_copy(update={"id": name, "root": root, "parent": ctx.name})

    @app.get("/v1/models", response_model=s.ModelList, responses=s.ERRORS)
    async def models():
        return s.ModelList(data=[card(), *(lora_card(name) for name in ctx.loras())])

    @app.get("/v1/models/{model_id}", response_model=s.ModelCard, responses=s.GENERATION_ERRORS)
    async def model(model_id: str):
        return card() if ctx.lora_for(model_id) is None else lora_card(model_id)

    # LoRA adapters loaded and unloaded at run time, as vLLM's routes (a plain-text answer).
    @app.post("/v1/load_lora_adapter", response_class=Response, responses=s.GENERATION_ERRORS)
    async def load_lora_adapter(body: s.LoadLoraAdapterRequest):
        await _lora_call(ctx, "load_lora", body.lora_name, body.lora_path)
        text = f"Success: LoRA adapter '{body.lora_name}' added successfully."
        return Response(text, media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", response_class=Response, responses=s.GENERATION_ERRORS)
    async def unload_lora_adapter(body: s.UnloadLoraAdapterRequest):
        await _lora_call(ctx, "unload_lora", body.lora_name)
        text = f"Success: LoRA adapter '{body.lora_name}' removed successfully."
        return Response(text, media_type="text/plain")

    embed_lock = threading.Lock()  # one embedding batch at a time through the VM

    @app.post("/v1/embeddings", response_model=s.EmbeddingResponse, responses=s.GENERATION_ERRORS)
    async def embeddings(body: s.EmbeddingRequest):
        ctx.check_model(body.model)
        texts = _embedding_texts(ctx, body)

        def run():
            with embed_lock:
                return ctx.llm.embed(texts), [ctx.llm.num_tokens(t) for t in texts]

        try:
            vectors, lengths = await asyncio.to_thread(run)
        except RelaxlmError as e:
            raise ApiError(400, str(e), "input") from e
        data = [
            s.Embedding(index=i, embedding=_encode_vector(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ]
        usage = s.EmbeddingUsage(prompt_tokens=sum(lengths), total_tokens=sum(lengths))
        return s.EmbeddingResponse(data=data, model=ctx.name, usage=usage)


def _add_service_routes(app: FastAPI, ctx: ModelContext, metrics: ServerMetrics) -> None:
    @app.get("/health", response_model=s.Health)
    async def health():
        return s.Health()

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize", response_model=s.TokenizeResponse, responses=s.GENERATION_ERRORS)
    async def tokenize(body: s.TokenizeRequest):
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "pass exactly one of `prompt` and `messages`", "prompt")
        if body.messages is not None:
            ctx.check_generates()
            tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
            ids = chat_prompt_ids(ctx, body.messages, tools)
            if isinstance(ids, ImagePrompt):  # the image token at every image position
                ids = ids.text_ids
        else:
            ids = ctx.llm.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        window = ctx.llm.manifest.context_window
        return s.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=window)

    @app.post("/detokenize", response_model=s.DetokenizeResponse, responses=s.GENERATION_ERRORS)
    async def detokenize(body: s.DetokenizeRequest):
        ctx.check_model(body.model)
        vocab = ctx.llm.tokenizer.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise ApiError(400, f"token ids must lie in [0, {vocab})", "tokens")
        return s.DetokenizeResponse(prompt=ctx.llm.tokenizer.decode(body.tokens))


async def _lora_call(ctx: ModelContext, method: str, name: str, *args) -> None:
    """AsyncLLM.load_lora / unload_lora off the event loop (they wait for the engine's step);
    a 404 for an adapter not loaded, a 400 naming the fault otherwise."""
    if name == ctx.name:
        raise ApiError(
            400, f"{name!r} is the base model's name; name the adapter otherwise", "lora_name"
        )
    if not hasattr(ctx.llm, method):
        raise ApiError(400, f"{ctx.name} serves no LoRA adapters", "lora_name")
    try:
        await asyncio.to_thread(getattr(ctx.llm, method), name, *args)
    except RelaxlmError as e:
        status = 404 if "is not loaded" in str(e) else 400
        raise ApiError(status, str(e), "lora_name" if status == 404 else "lora_path") from e
    except (OSError, ValueError) as e:  # a path the file system refuses (a NUL byte, ...)
        raise ApiError(400, f"lora_path: {e}", "lora_path") from e


async def _unless_client_leaves(request: Request, work: Awaitable):
    """The result of `work`; cancelled (which aborts its engine request and frees its KV pages)
    if the client disconnects first. Streams return at once; this guards whole answers."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return Response(status_code=499)  # "client closed request"; nobody reads it
    finally:
        task.cancel()  # no-op once done


def _answer(result):
    """A response model or Response as it is; a stream of chunks as Server-Sent Events."""
    if isinstance(result, s.ToolLoopResponse):  # more fields than the route's response_model
        unset = {"mcp_errors"} if result.mcp_errors is None else None
        return JSONResponse(result.model_dump(mode="json", exclude=unset))
    if isinstance(result, BaseModel | Response):
        return result
    return EventStream(_sse(result))


def _embedding_texts(ctx: ModelContext, body: s.EmbeddingRequest) -> list[str]:
    if not ctx.is_embedding:
        raise ApiError(
            400,
            f"{ctx.name} generates text; /v1/embeddings needs an embedding model (a "
            "sentence-transformers folder, e.g. all-MiniLM-L6-v2)",
            "model",
        )
    if body.dimensions is not None:
        raise ApiError(400, "dimensions is not supported; leave it out", "dimensions")
    items = [body.input] if isinstance(body.input, str) else list(body.input)
    if not items or not all(isinstance(t, str) for t in items):
        raise ApiError(400, "input must be a string or a non-empty list of strings", "input")
    return items


def _encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]


# -- streaming ----------------------------------------------------------------------------------


async def _sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-Sent Events: one `data:` line per chunk, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_unset=False)}\n\n"
    except Exception as e:  # after the 200 went out, an error can only be an event
        if not isinstance(e, ApiError | RelaxlmError):
            logger.exception("a streamed request failed")
        error = e if isinstance(e, ApiError) else _internal_or_bad(e)
        yield f"data: {s.ErrorResponse(**error.body()).model_dump_json()}\n\n"
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"


def _internal_or_bad(e: Exception) -> ApiError:
    if isinstance(e, RelaxlmError):
        return _relaxlm_api_error(e)
    return ApiError(500, f"the engine failed: {e}", type="server_error")


def _relaxlm_api_error(e: RelaxlmError) -> ApiError:
    if isinstance(e, Unavailable):  # a replica died mid-answer: the request itself was fine
        return ApiError(503, str(e), type="server_error", code="unavailable")
    return ApiError(400, str(e))


class EventStream(StreamingResponse):
    """An SSE response that stops (and closes its iterator, aborting the request) as soon as
    the client disconnects, whatever the ASGI version; Starlette alone notices only at the
    next write under ASGI 2.4."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


# -- errors, auth, request counts --------------------------------------------------------------


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RelaxlmError)
    async def relaxlm_error(request: Request, e: RelaxlmError):
        return _error_response(_relaxlm_api_error(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _error_response(_validation_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(e.status_code, str(e.detail), type=kind))


def _validation_error(e: RequestValidationError) -> ApiError:
    """A 400 naming the first wrong field (`messages.0.role`), as OpenAI's `param`."""
    errors = e.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Pydantic names the union member it tried ("str", "list[str]"); the field is what matters.
    loc = [p for p in loc if not _is_type_name(p)]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first.get("type") == "json_invalid":
        message, param = f"the body is not valid JSON: {first['msg']}", None
    return ApiError(400, message, param)


def _is_type_name(part: str) -> bool:
    return (
        part in ("str", "int", "float", "bool", "dict", "list")
        or part.startswith(("list[", "dict[", "function-", "constrained-", "Annotated["))
        or part[:1].isupper()  # a model's name, as in a union ("TextPart")
    )


class _AuthAndCount:
    """ASGI middleware: the API-key check, and a count of every answer by route and status.

    Plain ASGI rather than @app.middleware("http"), which would wrap streamed responses and
    hide client disconnects from them.
    """

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        open_paths: tuple[str, ...],
        metrics: ServerMetrics,
        router,
    ):
        self.app, self.api_key, self.metrics, self.router = app, api_key, metrics, router
        self.open_paths = open_paths
        self._known: set[str] | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self._known is None:  # routes are all added by the first request
            self._known = {getattr(r, "path", "") for r in self.router.routes}
        route = path if path in self._known else "other"  # bounded label values
        is_open = path in self.open_paths or path.startswith(_OPEN_PREFIXES) or path == "/ui"
        if self.api_key is not None and not is_open:
            if not self._authorized(scope):
                error = ApiError(
                    401,
                    "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                self.metrics.count(route, 401)
                await _error_response(error)(scope, receive, send)
                return
        status = 500  # if the app fails before it answers

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.count(route, status)

    def _authorized(self, scope) -> bool:
        expected = f"Bearer {self.api_key}".encode()
        headers = dict(scope.get("headers") or [])
        return hmac.compare_digest(headers.get(b"authorization", b""), expected)

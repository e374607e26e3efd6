"""The loaded model as an MCP server, on the official `mcp` SDK.

Tools: `chat` (messages + sampling fields), `complete` (a prompt), `embed` (embedding models),
`tokenize`, `list_models`; resources: the artifact's manifest and the checkpoint config. A
failure (bad arguments, a prompt over the context window, `embed` on a text model) comes back as
an MCP tool error with the reason, never as a crash of the server.

Transports: stdio for `relaxlm mcp MODEL` (`run_stdio`), streamable HTTP at `/mcp` of the
OpenAI server (`http_routes`, whose session manager runs in the app's lifespan).

`chat` goes through the same chat-completion function as `POST /v1/chat/completions`
(completions.chat_completion, with the MCP tool loop when the OpenAI server has one), so a seeded
request gives the same answer on both.
"""

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resources import FunctionResource
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import BaseRoute

from relaxlm.errors import RelaxlmError
from relaxlm.sdk import LLM, AsyncLLM, EmbeddingLLM
from relaxlm.server import completions, schemas
from relaxlm.server.mcp_client import McpTools, chat_with_tools, load_config, stream_with_tools

# An OpenAI chat-completions request body in, the response body (or its chunks) out.
ChatCompletion = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# The streamed form: awaiting it checks the request (ApiError before any chunk), then the chunks.
ChatStream = Callable[[dict[str, Any]], Awaitable[AsyncIterator[dict[str, Any]]]]


class Message(BaseModel):
    """One chat message, as in OpenAI's chat API (extra keys such as tool_calls are kept)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""


def build_mcp_server(
    ctx: completions.ModelContext, chat_completion: ChatCompletion | None = None
) -> MCPServer:
    """An MCPServer whose tools and resources serve the model of `ctx` (the OpenAI server's:
    its LLM and served name).

    chat_completion: what `chat` calls: the chat route's path (with the MCP tool loop when
        there is one); `chat_function(ctx)` by default.
    """
    llm, model_name = ctx.llm, ctx.name
    is_embedder = ctx.is_embedding
    chat_completion = chat_completion or chat_function(ctx)
    server = MCPServer(
        "relaxlm",
        instructions=f"relaxlm serving {model_name} ({llm.manifest.architecture}); "
        "call `chat` for an assistant reply, `complete` to continue text.",
        log_level="WARNING",
    )

    @server.tool()
    async def chat(
        messages: list[Message],
        max_tokens: int | None = Field(None, description="tokens to generate at most"),
        temperature: float | None = Field(None, description="0 is greedy"),
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        seed: int | None = Field(None, description="same seed, same answer"),
        stop: list[str] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
    ) -> CallToolResult:
        """The model's reply to a conversation, through its chat template."""
        if is_embedder:
            raise ToolError(_embedder_message(model_name, "chat"))
        fields = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "seed": seed,
            "stop": stop,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "repetition_penalty": repetition_penalty,
        }
        request = {
            "model": model_name,
            "messages": [m.model_dump(exclude_none=True) for m in messages],
            **{k: v for k, v in fields.items() if v is not None},
        }
        try:
            response = await chat_completion(request)
        except (RelaxlmError, completions.ApiError) as e:  # the 4xx the HTTP API would answer
            raise ToolError(str(e)) from e
        choice = response["choices"][0]
        content = choice["message"].get("content") or ""
        return CallToolResult(
            content=[TextContent(type="text", text=content)],
            structured_content={
                "content": content,
                "finish_reason": choice.get("finish_reason"),
                "tool_calls": choice["message"].get("tool_calls") or [],
                "usage": response.get("usage"),
            },
        )

    @server.tool()
    async def complete(
        prompt: str,
        max_tokens: int | None = Field(None, description="tokens to generate at most (16)"),
        temperature: float | None = Field(None, description="0 is greedy"),
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> CallToolResult:
        """The model's continuation of `prompt` as plain text (no chat template), as
        /v1/completions answers it."""
        if is_embedder:
            raise ToolError(_embedder_message(model_name, "complete"))
        fields = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "stop": stop,
        }
        body = {"model": model_name, "prompt": prompt}
        body |= {k: v for k, v in fields.items() if v is not None}
        try:
            request = schemas.CompletionRequest.model_validate(body)
            response = await completions.text_completion(ctx, request)
        except ValidationError as e:
            raise ToolError(_validation_message(e)) from e
        except (RelaxlmError, completions.ApiError) as e:
            raise ToolError(str(e)) from e
        choice = response.choices[0]
        return CallToolResult(
            content=[TextContent(type="text", text=choice.text)],
            structured_content={
                "text": choice.text,
                "finish_reason": choice.finish_reason,
                "usage": response.usage.model_dump(),
            },
        )

    @server.tool()
    async def embed(texts: list[str]) -> CallToolResult:
        """Embedding vectors of `texts` (embedding models only)."""
        if not is_embedder:
            raise ToolError(
                f"{model_name} ({llm.manifest.architecture}) generates text and has no "
                "embeddings; serve an embedding model (e.g. a sentence-transformers folder) to "
                "use `embed`, or call `chat` / `complete`"
            )
        try:
            vectors = llm.embed(texts).tolist()
        except RelaxlmError as e:
            raise ToolError(str(e)) from e
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(vectors))],
            structured_content={"embeddings": vectors, "dim": len(vectors[0]) if vectors else 0},
        )

    @server.tool()
    def tokenize(
        text: str, add_special_tokens: bool = Field(True, description="BOS etc. as the model's")
    ) -> CallToolResult:
        """Token ids of `text` under the model's tokenizer."""
        ids = llm.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        tokens = [llm.tokenizer.id_to_token(i) for i in ids]
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(ids))],
            structured_content={"token_ids": ids, "tokens": tokens, "count": len(ids)},
        )

    @server.tool()
    def list_models() -> CallToolResult:
        """The models this server serves, with architecture, task and context window."""
        models = [model_card(llm, model_name)]
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(models))],
            structured_content={"models": models},
        )

    server.add_resource(
        FunctionResource(
            uri=f"relaxlm://models/{model_name}/manifest",
            name="manifest",
            description=f"{model_name}'s artifact manifest: versions, config, quantization, "
            "KV-cache layout, parameter index, targets",
            mime_type="application/json",
            fn=llm.manifest.to_json,
        )
    )
    server.add_resource(
        FunctionResource(
            uri=f"relaxlm://models/{model_name}/config",
            name="config",
            description=f"{model_name}'s checkpoint config.json",
            mime_type="application/json",
            fn=lambda: json.dumps(llm.manifest.model_config, indent=2),
        )
    )
    return server


def model_card(llm: AsyncLLM | EmbeddingLLM, model_name: str) -> dict[str, Any]:
    """What a client needs to know of the loaded model, as a JSON-able dict."""
    m = llm.manifest
    return {
        "id": model_name,
        "architecture": m.architecture,
        "task": m.task,
        "context_window": m.context_window,
        "dtype": m.dtype,
        "quantization": m.quantization.get("scheme"),
        "targets": sorted(m.targets),
        "artifact": str(llm.artifact),
    }


def chat_function(ctx: completions.ModelContext) -> ChatCompletion:
    """/v1/chat/completions as a function of JSON bodies (non-streamed); ApiError as the route's.

    The tool loop and the `chat` tool build request bodies as dicts; this validates them with
    the route's own schema, so they are answered exactly as over HTTP.
    """

    async def chat_completion(body: dict[str, Any]) -> dict[str, Any]:
        request = _validated({**body, "stream": False})
        response = await completions.chat_completion(ctx, request)
        return response.model_dump(mode="json")

    return chat_completion


def chat_stream_function(ctx: completions.ModelContext) -> ChatStream:
    """The streamed /v1/chat/completions as a function of JSON bodies: the chunks as dicts."""

    async def chat_stream(body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        request = _validated({**body, "stream": True})
        chunks = await completions.chat_completion(ctx, request)

        async def dicts() -> AsyncIterator[dict[str, Any]]:
            try:
                async for chunk in chunks:
                    yield chunk.model_dump(mode="json", exclude_none=True)
            finally:
                await chunks.aclose()  # a client gone mid-stream aborts the engine request

        return dicts()

    return chat_stream


def _validated(body: dict[str, Any]) -> schemas.ChatCompletionRequest:
    try:
        return schemas.ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise completions.ApiError(400, _validation_message(e), field) from e


def _validation_message(e: ValidationError) -> str:
    """`field: what is wrong` for the first error, as the HTTP API's 400s say it."""
    error = e.errors()[0]
    return f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"


def http_routes(
    server: MCPServer, host: str = "127.0.0.1"
) -> tuple[list[BaseRoute], Callable[[], AbstractAsyncContextManager[None]]]:
    """The `/mcp` streamable-HTTP route to add to an ASGI app, and the session manager's
    context, to enter in that app's lifespan (a mounted sub-app's lifespan never runs).

    host: the bind address; on loopback the SDK checks Host/Origin against DNS rebinding.
    """
    app = server.streamable_http_app(streamable_http_path="/mcp", host=host)
    return list(app.routes), server.session_manager.run


def install_mcp(app: FastAPI, ctx: completions.ModelContext, options) -> None:
    """What `create_app` adds for MCP, as its ServerOptions say.

    options.mcp_config: the MCP servers whose tools the model may call; sets
        `app.state.tool_loop` (body -> response dict, or an async iterator of chunk dicts when
        streamed) for the chat route, and opens the sessions in the app's lifespan.
    options.mcp: the model as an MCP server at /mcp (streamable HTTP); its `chat` tool goes
        through the same tool loop as the chat route.
    options.max_tool_rounds: the tool loop's bound on rounds of tool calls.
    """
    if options.max_tool_rounds < 0:
        raise RelaxlmError(
            f"max_tool_rounds={options.max_tool_rounds}; it must be >= 0 (0: run no MCP tool)"
        )
    complete, stream = chat_function(ctx), chat_stream_function(ctx)
    tools = McpTools(load_config(options.mcp_config)) if options.mcp_config else None
    app.state.mcp_tools = tools
    app.state.tool_loop = None
    mcp_chat = complete  # what the /mcp `chat` tool calls: the chat route's path
    if tools is not None:
        rounds = options.max_tool_rounds

        async def tool_loop(request: schemas.ChatCompletionRequest):
            body = request.model_dump(mode="json", by_alias=True, exclude_unset=True)
            if request.stream:
                return await stream_with_tools(body, stream, tools, rounds)
            return await chat_with_tools(body, complete, tools, rounds)

        app.state.tool_loop = tool_loop

        async def mcp_chat(body: dict[str, Any]) -> dict[str, Any]:
            return await chat_with_tools(body, complete, tools, rounds)

    run_sessions = None
    if options.mcp:
        server = build_mcp_server(ctx, mcp_chat)
        routes, run_sessions = http_routes(server, options.host)
        app.router.routes.extend(routes)
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI):
        async with AsyncExitStack() as stack:
            if tools is not None:
                await tools.connect(stack)
            if run_sessions is not None:
                await stack.enter_async_context(run_sessions())
            async with previous(app_) as state:
                yield state

    app.router.lifespan_context = lifespan


def run_stdio(llm: LLM | EmbeddingLLM, model_name: str) -> None:
    """Serve `llm` over stdio until the client closes stdin (`relaxlm mcp MODEL`)."""
    build_mcp_server(completions.ModelContext.serving(llm, model_name)).run("stdio")


def _embedder_message(model_name: str, tool: str) -> str:
    return (
        f"{model_name} is an embedding model: it has no KV cache to generate text with, so "
        f"`{tool}` is unavailable; call `embed`"
    )

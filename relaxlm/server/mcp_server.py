"""The loaded model as an MCP server, on the official `mcp` SDK.

Tools: `chat` (messages + the chat route's sampling fields), `complete` (a prompt), `embed`
(embedding models), `tokenize`, `list_models`; resources: the artifact's manifest and the
checkpoint config. A failure (bad arguments, a prompt over the context window, `embed` on a text
model) comes back as an MCP tool error with the reason, never as a crash of the server.

Transports: stdio for `relaxlm mcp MODEL` (`run_stdio`), streamable HTTP at `/mcp` of the
OpenAI server (`McpModelServer.http_routes`, whose sessions run in the app's lifespan).

An image-generation artifact is served by `McpImageServer` instead: one tool, `generate_image`,
whose images come back as MCP image content (PNG), through the same checks and pipeline as
`POST /v1/images/generations`.

`chat` goes through the same function as `POST /v1/chat/completions` (completions.chat_completion,
or the MCP tool loop when the OpenAI server has one), so a seeded request gives the same answer
on both.
"""

import base64
import functools
import inspect
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resources import FunctionResource
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import BaseModel, ValidationError
from starlette.routing import BaseRoute

from relaxlm.errors import RelaxlmError
from relaxlm.sdk import LLM, AsyncLLM, EmbeddingLLM
from relaxlm.server import completions
from relaxlm.server import schemas as s
from relaxlm.server.completions import Chat

# Request fields a tool fixes: the model is the served one, and a tool answers one choice's
# text, whole. The tools take every other field of the route's schema, with its ranges.
_FIXED_FIELDS = {"model", "stream", "stream_options", "n", "logprobs", "top_logprobs", "user"}
_FIXED_FIELDS |= set(s.REFUSED_FIELDS)
_COMPLETE_FIXED = _FIXED_FIELDS | {"echo", "suffix", "best_of"}


class _McpTransports:
    """The streamable-HTTP transport of an MCPServer held as `self.server`."""

    server: MCPServer

    def http_routes(self) -> list[BaseRoute]:
        """The `/mcp` streamable-HTTP route to add to an ASGI app; enter `sessions()` in that
        app's lifespan (a mounted sub-app's lifespan never runs).

        The app checks Host and Origin for all its routes (guards.RequestGuard), so the SDK's
        own check, which would differ from the other routes', is off.
        """
        app = self.server.streamable_http_app(
            streamable_http_path="/mcp",
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        return list(app.routes)

    def sessions(self) -> AbstractAsyncContextManager[None]:
        """The streamable-HTTP session manager's run, for the serving app's lifespan."""
        return self.server.session_manager.run()


class McpModelServer(_McpTransports):
    """An MCPServer whose tools and resources serve the model of `ctx` (the OpenAI server's:
    its SDK model and served name).

    chat: what the `chat` tool calls: the chat route's function (with the MCP tool loop when
        there is one); completions.chat_completion by default.
    """

    def __init__(self, ctx: completions.ModelContext, chat: Chat | None = None):
        self.ctx = ctx
        self._chat = chat or functools.partial(completions.chat_completion, ctx)
        llm, name = ctx.llm, ctx.name
        self.server = MCPServer(
            "relaxlm",
            instructions=f"relaxlm serving {name} ({llm.manifest.architecture}); "
            "call `chat` for an assistant reply, `complete` to continue text.",
            log_level="WARNING",
        )
        self.server.add_tool(_taking_fields(self.chat, s.ChatCompletionRequest, _FIXED_FIELDS))
        self.server.add_tool(
            _taking_fields(self.complete, s.CompletionRequest, _COMPLETE_FIXED, prompt=str)
        )
        for tool in (self.embed, self.tokenize, self.list_models):
            self.server.add_tool(tool)
        for resource, description, read in (
            (
                "manifest",
                f"{name}'s artifact manifest: versions, config, quantization, KV-cache layout, "
                "parameter index, targets",
                llm.manifest.to_json,
            ),
            (
                "config",
                f"{name}'s checkpoint config.json",
                lambda: json.dumps(llm.manifest.model_config, indent=2),
            ),
        ):
            self.server.add_resource(
                FunctionResource(
                    uri=f"relaxlm://models/{name}/{resource}",
                    name=resource,
                    description=description,
                    mime_type="application/json",
                    fn=read,
                )
            )

    # -- tools (their docstrings are the descriptions clients see) ------------------------------

    async def chat(self, **fields) -> CallToolResult:
        """The model's reply to a conversation, through its chat template."""
        self._check_generates("chat")
        request = self._request(s.ChatCompletionRequest, fields)
        try:
            response = await self._chat(request)
        except (RelaxlmError, completions.ApiError) as e:  # the 4xx the HTTP API would answer
            raise ToolError(str(e)) from e
        choice = response.choices[0]
        content = choice.message.content or ""
        return CallToolResult(
            content=[TextContent(type="text", text=content)],
            structured_content={
                "content": content,
                "finish_reason": choice.finish_reason,
                "tool_calls": [c.model_dump() for c in choice.message.tool_calls or []],
                "usage": response.usage.model_dump(),
            },
        )

    async def complete(self, **fields) -> CallToolResult:
        """The model's continuation of `prompt` as plain text (no chat template), as
        /v1/completions answers it."""
        self._check_generates("complete")
        request = self._request(s.CompletionRequest, fields)
        try:
            response = await completions.text_completion(self.ctx, request)
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

    async def embed(self, texts: list[str]) -> CallToolResult:
        """Embedding vectors of `texts` (embedding models only)."""
        if not self.ctx.is_embedding:
            raise ToolError(
                f"{self.ctx.name} ({self.ctx.llm.manifest.architecture}) generates text and has "
                "no embeddings; serve an embedding model (e.g. a sentence-transformers folder) "
                "to use `embed`, or call `chat` / `complete`"
            )
        try:
            vectors = self.ctx.llm.embed(texts).tolist()
        except RelaxlmError as e:
            raise ToolError(str(e)) from e
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(vectors))],
            structured_content={"embeddings": vectors, "dim": len(vectors[0]) if vectors else 0},
        )

    def tokenize(self, text: str, add_special_tokens: bool = True) -> CallToolResult:
        """Token ids of `text` under the model's tokenizer (BOS etc. as the model's config
        says, unless add_special_tokens is false)."""
        tokenizer = self.ctx.llm.tokenizer
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        tokens = [tokenizer.id_to_token(i) for i in ids]
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(ids))],
            structured_content={"token_ids": ids, "tokens": tokens, "count": len(ids)},
        )

    def list_models(self) -> CallToolResult:
        """The models this server serves, with architecture, task and context window."""
        models = [model_card(self.ctx.llm, self.ctx.name)]
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(models))],
            structured_content={"models": models},
        )

    def _check_generates(self, tool: str) -> None:
        if self.ctx.is_embedding:
            raise ToolError(
                f"{self.ctx.name} is an embedding model: it has no KV cache to generate text "
                f"with, so `{tool}` is unavailable; call `embed`"
            )

    def _request(self, schema: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
        try:
            return schema.model_validate({**fields, "model": self.ctx.name, "stream": False})
        except ValidationError as e:
            error = e.errors()[0]
            raise ToolError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from e


class McpImageServer(_McpTransports):
    """An MCPServer with one tool, `generate_image`, over an image server's ImageService
    (image_generation.py, which builds this server: hence no import of it here)."""

    def __init__(self, service):
        self.service = service
        self.server = MCPServer(
            "relaxlm",
            instructions=f"relaxlm serving {service.name}, a text-to-image model making "
            f"{service.size} images; call `generate_image` with a prompt.",
            log_level="WARNING",
        )
        fixed = {"model", "size", "response_format"}
        self.server.add_tool(_taking_fields(self.generate_image, service.Request, fixed))

    async def generate_image(self, **fields) -> CallToolResult:
        """Images (PNG) for `prompt`: `n` of them, image i from seed + i, in `steps` denoising
        steps with classifier-free guidance `guidance_scale` (1 turns it off)."""
        try:
            request = self.service.Request.model_validate(fields)
            pngs, truncated = await self.service.generate(request)
        except ValidationError as e:
            error = e.errors()[0]
            raise ToolError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from e
        except completions.ApiError as e:
            raise ToolError(str(e)) from e
        content = [
            ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png")
            for png in pngs
        ]
        note = f"{len(pngs)} image(s), {self.service.size}, seed {request.seed}"
        if truncated:
            note += "; the prompt was longer than the text encoder reads and was cut"
        return CallToolResult(
            content=[TextContent(type="text", text=note), *content],
            structured_content={
                "count": len(pngs),
                "size": self.service.size,
                "seed": request.seed,
                "prompt_truncated": truncated,
            },
        )


def _taking_fields(tool, schema: type[BaseModel], fixed: set[str], **types) -> Callable:
    """`tool` (which takes **fields) with the keyword signature of `schema`'s fields less
    `fixed`, each with its type, range and default: MCP derives the tool's input schema from it.

    types: a narrower type for a field (the `complete` tool's prompt is one text).
    """

    @functools.wraps(tool)
    async def call(**fields) -> CallToolResult:
        return await tool(**fields)

    parameters = []
    for name, field in schema.model_fields.items():
        if name in fixed:
            continue
        required = field.is_required() or name in types
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=types.get(name) or Annotated[field.annotation, field],
                default=inspect.Parameter.empty if required else field.get_default(),
            )
        )
    call.__signature__ = inspect.Signature(parameters, return_annotation=CallToolResult)
    return call


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


def run_stdio(llm: LLM | EmbeddingLLM, model_name: str) -> None:
    """Serve `llm` over stdio until the client closes stdin (`relaxlm mcp MODEL`)."""
    McpModelServer(completions.ModelContext.serving(llm, model_name)).server.run("stdio")

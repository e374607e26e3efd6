"""relaxlm as an MCP client: tools of other MCP servers offered to the model on chat requests.

`--mcp-config FILE` names the servers, in the shape Claude Desktop and most MCP hosts use:

    {"mcpServers": {
        "files": {"command": "python", "args": ["server.py"], "env": {"KEY": "value"}},
        "search": {"url": "http://127.0.0.1:9000/mcp"}}}

`McpTools.connect` opens one session per server at start-up (stdio subprocess or streamable
HTTP, with the `mcp` SDK's `Client`) onto an AsyncExitStack that the OpenAI server closes at
shutdown, and lists their tools; a server that cannot be reached is logged and reported in every
chat response (`mcp_errors`), and the others still serve.

`ToolLoop` is the tool loop, which the OpenAI server's chat route and /mcp `chat` tool call in
place of the plain chat function; requests and responses stay the server's pydantic models
(schemas.py) throughout. The MCP tools are merged into the request's `tools`; when the model
calls one, it runs through its session, the assistant's call and the tool's result are appended
to the messages, and the model is asked again, until it answers, calls a tool of the client's
own (returned to the client as usual), or `max_tool_rounds` rounds have run. The response
carries the calls and results as `mcp_trace`; streamed, each call and result is an extra chunk
(an McpEventChunk) between the model's own chunks.
"""

import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from relaxlm.errors import RelaxlmError
from relaxlm.server import schemas as s
from relaxlm.server.completions import Chat, merge_tool_calls

logger = logging.getLogger("relaxlm.mcp")

DEFAULT_MAX_TOOL_ROUNDS = 4


@dataclass(frozen=True)
class ServerSpec:
    """One entry of the config's `mcpServers`: a command to spawn (stdio) or a URL (HTTP)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None

    def transport(self) -> StdioServerParameters | str:
        if self.url:
            return self.url
        return StdioServerParameters(
            command=self.command, args=list(self.args), env=self.env or None, cwd=self.cwd
        )


def load_config(path: str | os.PathLike) -> list[ServerSpec]:
    """The servers an MCP config file lists; RelaxlmError naming the entry when it is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RelaxlmError(f"--mcp-config {path}: cannot read it ({e})") from e
    except json.JSONDecodeError as e:
        raise RelaxlmError(f"--mcp-config {path}: not valid JSON ({e})") from e
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise RelaxlmError(
            f'--mcp-config {path}: expected {{"mcpServers": {{NAME: {{"command": ..., "args": '
            '[...]} or {"url": "http://..."}}}'
        )
    return [_server_spec(path, name, entry) for name, entry in servers.items()]


def _server_spec(path: Path, name: str, entry: Any) -> ServerSpec:
    where = f"--mcp-config {path}: mcpServers.{name}"
    if not isinstance(entry, dict):
        raise RelaxlmError(f"{where} is {entry!r}; expected an object with 'command' or 'url'")
    url, command = entry.get("url"), entry.get("command")
    if bool(url) == bool(command):
        raise RelaxlmError(f"{where} needs exactly one of 'command' (stdio) or 'url' (HTTP)")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise RelaxlmError(f"{where}.url is {url!r}; expected an http:// or https:// URL")
    if command is not None and not isinstance(command, str):
        raise RelaxlmError(f"{where}.command is {command!r}; expected a string")
    args, env = entry.get("args", []), entry.get("env", {})
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise RelaxlmError(f"{where}.args is {args!r}; expected a list of strings")
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise RelaxlmError(f"{where}.env is {env!r}; expected an object of strings")
    return ServerSpec(name, command, tuple(args), dict(env), entry.get("cwd"), url)


@dataclass(frozen=True)
class McpTool:
    """A tool of a connected server, under the name the model sees."""

    server: str
    name: str  # an OpenAI function name, unique across servers (see _function_name)
    remote_name: str
    description: str
    input_schema: dict[str, Any]

    def openai(self) -> s.Tool:
        """The tool as an OpenAI `tools` entry."""
        function = s.FunctionSpec(
            name=self.name,
            description=self.description or f"{self.remote_name} (MCP server {self.server})",
            parameters=self.input_schema or {"type": "object", "properties": {}},
        )
        return s.Tool(type="function", function=function)


@dataclass
class ToolOutcome:
    text: str
    is_error: bool


class McpTools:
    """Sessions with the configured MCP servers and the tools they offer.

    connect_timeout_s: bound on each request while connecting (a server that never answers
        delays start-up by a few times this, then is reported unavailable).
    call_timeout_s: a tool call that takes longer is reported as failed.
    """

    def __init__(
        self, specs: list[ServerSpec], connect_timeout_s: float = 20.0, call_timeout_s: float = 60.0
    ):
        self.specs = specs
        self.connect_timeout_s, self.call_timeout_s = connect_timeout_s, call_timeout_s
        self.tools: dict[str, McpTool] = {}
        self.errors: dict[str, str] = {}  # server name -> why it is not available
        self._clients: dict[str, Client] = {}

    async def connect(self, stack: AsyncExitStack) -> None:
        """Open every server's session onto `stack` and list its tools; never raises."""
        for spec in self.specs:
            try:
                client = await stack.enter_async_context(
                    Client(spec.transport(), read_timeout_seconds=self.connect_timeout_s)
                )
                listed = await client.list_tools()
            except Exception as e:  # any transport failure: this server is left out
                self.errors[spec.name] = f"MCP server {spec.name!r} is unavailable: {_reason(e)}"
                logger.error("%s", self.errors[spec.name])
                continue
            self._clients[spec.name] = client
            for tool in listed.tools:
                name = _function_name(spec.name, tool.name, self.tools)
                self.tools[name] = McpTool(
                    spec.name, name, tool.name, tool.description or "", dict(tool.input_schema)
                )
            logger.info("MCP server %r: tools %s", spec.name, [t.name for t in listed.tools])

    def openai_tools(self) -> list[s.Tool]:
        return [tool.openai() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str | dict[str, Any]) -> ToolOutcome:
        """Run tool `name`; a failure of any kind comes back as an error outcome."""
        tool = self.tools.get(name)
        if tool is None:
            return ToolOutcome(f"no MCP tool named {name!r}", True)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                return ToolOutcome(f"arguments of {name!r} are not valid JSON ({e})", True)
        if not isinstance(arguments, dict):
            return ToolOutcome(f"arguments of {name!r} must be a JSON object: {arguments!r}", True)
        try:
            client = self._clients[tool.server]
            result = await client.call_tool(tool.remote_name, arguments, self.call_timeout_s)
        except Exception as e:  # the session broke: the server crashed, timed out or hung up
            message = f"MCP tool {name!r} (server {tool.server!r}) failed: {_reason(e)}"
            logger.error("%s", message)
            return ToolOutcome(message, True)
        texts = [block.text for block in result.content if getattr(block, "text", None)]
        if not texts and result.structured_content is not None:
            texts = [json.dumps(result.structured_content)]
        return ToolOutcome("\n".join(texts), bool(result.is_error))


def _function_name(server: str, tool: str, taken: dict[str, McpTool]) -> str:
    """An OpenAI function name for `tool` (at most 64 of [A-Za-z0-9_.-]), unique among `taken`:
    `server__tool` when another server has a tool of that name."""
    for name in (tool, f"{server}__{tool}"):
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:64]
        if name not in taken:
            return name
    n = 2
    while f"{name[:58]}_{n}" in taken:
        n += 1
    return f"{name[:58]}_{n}"


def _reason(e: BaseException) -> str:
    """The innermost useful message of an exception (task groups wrap theirs in groups)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# -- the tool loop --------------------------------------------------------------------------------


class ToolLoop:
    """The chat route with MCP tools run on the server side: what /v1/chat/completions and the
    /mcp `chat` tool call when MCP servers are configured.

    chat: the chat route's own function (completions.chat_completion for the served model).
    """

    def __init__(self, chat: Chat, tools: McpTools, max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS):
        if max_tool_rounds < 0:
            raise RelaxlmError(
                f"max_tool_rounds={max_tool_rounds}; it must be >= 0 (0: run no MCP tool)"
            )
        self.chat, self.tools, self.max_tool_rounds = chat, tools, max_tool_rounds

    async def __call__(
        self, request: s.ChatCompletionRequest
    ) -> s.ToolLoopResponse | AsyncIterator[s.ChatCompletionChunk]:
        """The answer after the tool rounds, or (request.stream) the chunks of every round."""
        if request.stream:
            return await stream_with_tools(request, self.chat, self.tools, self.max_tool_rounds)
        return await chat_with_tools(request, self.chat, self.tools, self.max_tool_rounds)


def _own_tool_names(request: s.ChatCompletionRequest) -> set[str]:
    return {t.function.name for t in request.tools or []}


def _with_mcp_tools(request: s.ChatCompletionRequest, mcp: McpTools) -> s.ChatCompletionRequest:
    """The request with the MCP tools added to its own (the client's tool wins a name clash)."""
    own_names = _own_tool_names(request)
    extra = [t for t in mcp.openai_tools() if t.function.name not in own_names]
    if not extra or request.tool_choice == "none":
        return request
    return request.model_copy(update={"tools": [*(request.tools or []), *extra]})


def _is_mcp_call(call: s.ResponseToolCall, mcp: McpTools, own_names: set[str]) -> bool:
    return call.function.name in mcp.tools and call.function.name not in own_names


async def _run_calls(
    calls: list[s.ResponseToolCall], mcp: McpTools, round_index: int, trace: list[s.McpToolRun]
) -> list[s.ChatMessage]:
    """Run the model's MCP tool calls; the `tool` messages to append, one per call."""
    messages = []
    for call in calls:
        name, arguments = call.function.name, call.function.arguments
        outcome = await mcp.call(name, arguments or "{}")
        trace.append(
            s.McpToolRun(
                round=round_index,
                id=call.id,
                server=mcp.tools[name].server,
                tool=name,
                arguments=arguments,
                result=outcome.text,
                is_error=outcome.is_error,
            )
        )
        messages.append(
            s.ChatMessage(role="tool", tool_call_id=call.id, name=name, content=outcome.text)
        )
    return messages


def _next_request(
    request: s.ChatCompletionRequest,
    content: str,
    calls: list[s.ResponseToolCall],
    tool_messages: list[s.ChatMessage],
) -> s.ChatCompletionRequest:
    """The request for the next round: the calls and their results appended; a forced
    tool_choice is lifted (forced again, the model could only ever call the tool again)."""
    assistant = s.ChatMessage(
        role="assistant",
        content=content,  # templates concatenate content: "", not None
        tool_calls=[
            s.ToolCall(id=c.id, function=s.FunctionCall(**c.function.model_dump())) for c in calls
        ],
    )
    update: dict[str, Any] = {"messages": [*request.messages, assistant, *tool_messages]}
    if request.tool_choice not in (None, "auto", "none"):
        update["tool_choice"] = "auto"
    return request.model_copy(update=update)


def _add_usage(total: s.Usage | None, usage: s.Usage | None) -> s.Usage | None:
    if usage is None or total is None:
        return usage or total
    return s.Usage(
        prompt_tokens=total.prompt_tokens + usage.prompt_tokens,
        completion_tokens=total.completion_tokens + usage.completion_tokens,
        total_tokens=total.total_tokens + usage.total_tokens,
    )


async def chat_with_tools(
    request: s.ChatCompletionRequest, chat: Chat, mcp: McpTools, max_tool_rounds: int
) -> s.ToolLoopResponse:
    """A non-streamed chat completion with MCP tools run on the server side.

    chat: the OpenAI server's chat function (a request with stream=False -> its response).
    Returns the last round's response plus `mcp_trace` (the calls and their results),
    `mcp_errors` (servers not available) and `usage` summed over the rounds.
    """
    own_names = _own_tool_names(request)
    request = _with_mcp_tools(request, mcp)
    trace: list[s.McpToolRun] = []
    usage = None
    errors = list(mcp.errors.values())
    response = await chat(request)  # the request's own errors are the caller's (a 4xx)
    for round_index in range(max_tool_rounds + 1):
        if round_index > 0:
            try:
                response = await chat(request)
            except Exception as e:  # e.g. the tool results overflow the context window
                errors.append(f"the model could not continue after the tool results: {e}")
                break
        usage = _add_usage(usage, response.usage)
        message = response.choices[0].message
        calls = message.tool_calls or []
        mcp_calls = [c for c in calls if _is_mcp_call(c, mcp, own_names)]
        # Stop when the model answered, called a tool of the client's, or the rounds ran out.
        if not calls or len(mcp_calls) < len(calls) or round_index == max_tool_rounds:
            break
        tool_messages = await _run_calls(mcp_calls, mcp, round_index, trace)
        request = _next_request(request, message.content or "", calls, tool_messages)
    if round_index == max_tool_rounds and calls and len(mcp_calls) == len(calls):
        errors.append(f"stopped after max_tool_rounds={max_tool_rounds} rounds of tool calls")
    fields = {**dict(response), "usage": usage or response.usage}
    return s.ToolLoopResponse(**fields, mcp_trace=trace, mcp_errors=errors or None)


async def stream_with_tools(
    request: s.ChatCompletionRequest, chat: Chat, mcp: McpTools, max_tool_rounds: int
) -> AsyncIterator[s.ChatCompletionChunk]:
    """The streamed tool loop: the model's chunks as they come, with progress chunks between.

    chat: the OpenAI server's chat function (a request with stream=True -> its chunks).
    Awaiting this function checks the request (its errors are the caller's, before any chunk);
    the chunks follow.

    Content deltas pass through at once. Tool-call deltas are held until the round ends: calls
    of MCP tools are then run and announced by McpEventChunks (no choices, an `mcp_event`
    {"type": "tool_call" | "tool_result", ...}); calls of the client's own tools are released
    as they came, with the model's finish chunk. MCP servers that are not available, and a
    round the model could not run, are announced as {"type": "error", "message": ...}.
    """
    own_names = _own_tool_names(request)
    request = _with_mcp_tools(request, mcp)
    first = await chat(request)
    return _stream_rounds(request, first, chat, mcp, own_names, max_tool_rounds)


async def _stream_rounds(
    request: s.ChatCompletionRequest,
    chunks: AsyncIterator[s.ChatCompletionChunk],
    chat: Chat,
    mcp: McpTools,
    own_names: set[str],
    max_tool_rounds: int,
) -> AsyncIterator[s.ChatCompletionChunk]:
    base = ("chatcmpl-mcp", request.model)  # (id, model), then the model's chunks'
    for error in mcp.errors.values():
        yield _event_chunk(base, {"type": "error", "message": error})
    for round_index in range(max_tool_rounds + 1):
        if round_index > 0:
            try:
                chunks = await chat(request)
            except Exception as e:  # e.g. the tool results overflow the context window
                message = f"the model could not continue after the tool results: {e}"
                yield _event_chunk(base, {"type": "error", "message": message})
                return
        held: list[s.ChatCompletionChunk] = []  # chunks with tool-call deltas or the finish
        calls: dict[int, s.ResponseToolCall] = {}  # index -> the call so far
        content: list[str] = []
        tail: list[s.ChatCompletionChunk] = []  # chunks after the finish (usage)
        async with aclosing(chunks):
            async for chunk in chunks:
                base = (chunk.id, chunk.model)
                if not chunk.choices:
                    tail.append(chunk)
                    continue
                choice = chunk.choices[0]
                if choice.delta.content:
                    content.append(choice.delta.content)
                if choice.delta.tool_calls or choice.finish_reason:
                    merge_tool_calls(calls, choice.delta.tool_calls or [])
                    held.append(chunk)
                else:
                    yield chunk
        ordered = [calls[i] for i in sorted(calls)]
        mcp_calls = [c for c in ordered if _is_mcp_call(c, mcp, own_names)]
        if not ordered or len(mcp_calls) < len(ordered) or round_index == max_tool_rounds:
            for chunk in held + tail:
                yield chunk
            return
        for call in mcp_calls:
            event = {"type": "tool_call", "round": round_index, "id": call.id}
            event |= {"tool": call.function.name, "arguments": call.function.arguments}
            yield _event_chunk(base, event)
        trace: list[s.McpToolRun] = []
        tool_messages = await _run_calls(mcp_calls, mcp, round_index, trace)
        for entry in trace:
            yield _event_chunk(base, {"type": "tool_result", **entry.model_dump()})
        request = _next_request(request, "".join(content), mcp_calls, tool_messages)


def _event_chunk(base: tuple[str, str], event: dict[str, Any]) -> s.McpEventChunk:
    chunk_id, model = base
    return s.McpEventChunk(
        id=chunk_id, created=int(time.time()), model=model, choices=[], mcp_event=event
    )

"""MCP, both ways, with the official `mcp` SDK at the other end.

Server: an `mcp` client over stdio (`relaxlm mcp ARTIFACT` as a subprocess) and over HTTP (/mcp
of a real uvicorn server on loopback) lists relaxlm's tools and calls them; `chat` answers what
/v1/chat/completions answers for the same seeded request.

Client: the server is started with --mcp-config naming tests/mcp_add_server.py (`add`) over
stdio and over HTTP, tests/mcp_crash_server.py (`divide`, which kills its process), a command
that does not exist and a URL nobody listens on. A chat request forcing `add` (its arguments
grammar-constrained, so the random-weight model writes a valid call) makes relaxlm run `add`
through the MCP session and answer; the crash and the unreachable servers come back as errors
in a 200 response.
"""

import asyncio
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import httpx2
import pytest
import requests
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from relaxlm.errors import RelaxlmError
from relaxlm.server import schemas
from relaxlm.server.app import ServerOptions, create_app
from relaxlm.server.background import BackgroundServer
from relaxlm.server.mcp_client import McpTools, _function_name, chat_with_tools, load_config
from relaxlm.testing.servers import free_port, running

MODEL = "tiny-mcp"
TESTS = Path(__file__).parent
TOOLS = {"chat", "complete", "embed", "tokenize", "list_models"}


@pytest.fixture(scope="module")
def llm(compiled):
    return compiled("qwen2")


@pytest.fixture(scope="module")
def http_adder():
    """tests/mcp_add_server.py over streamable HTTP, in a subprocess: its /mcp URL."""
    port = free_port()
    command = [sys.executable, str(TESTS / "mcp_add_server.py"), "--http", str(port)]
    with running(command, port, timeout=30) as url:
        yield f"{url}/mcp"


@pytest.fixture(scope="module")
def mcp_config(tmp_path_factory, http_adder) -> Path:
    path = tmp_path_factory.mktemp("mcp") / "mcp.json"
    servers = {
        "adder": {"command": sys.executable, "args": [str(TESTS / "mcp_add_server.py")]},
        "crasher": {"command": sys.executable, "args": [str(TESTS / "mcp_crash_server.py")]},
        "missing": {"command": str(TESTS / "no-such-mcp-server")},
        "web": {"url": http_adder},
        "offline": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
    }
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


@pytest.fixture(scope="module")
def server(llm, mcp_config):
    options = ServerOptions(served_model_name=MODEL, mcp=True, mcp_config=str(mcp_config))
    with BackgroundServer(create_app(llm, options)) as s:
        yield s


def chat(server, **body) -> requests.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Add 2 and 3."}], **body}
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def forced(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


async def call_chat(client: Client, **arguments) -> str:
    result = await client.call_tool("chat", arguments)
    assert not result.is_error, result.content
    return result.content[0].text


SEEDED = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "seed": 5}


# -- relaxlm as an MCP server ------------------------------------------------------------------


def test_stdio_server_chat_equals_http_answer(llm, server):
    command = [sys.executable, "-m", "relaxlm", "mcp", str(llm.artifact)]

    async def session():
        params = StdioServerParameters(
            command=command[0], args=command[1:] + ["--served-model-name", MODEL]
        )
        async with Client(params) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            answer = await call_chat(client, **SEEDED, temperature=0.8)
            ids = (await client.call_tool("tokenize", {"text": "Hello there"})).structured_content
            return names, answer, ids

    names, answer, ids = asyncio.run(session())
    assert TOOLS <= names
    # No MCP tools in a stdio server: compare with an HTTP request that offers none either.
    http = chat(server, **SEEDED, temperature=0.8, tool_choice="none").json()
    assert answer == http["choices"][0]["message"]["content"]
    assert answer  # a seeded answer of 12 tokens is not empty
    assert ids["token_ids"] == llm.tokenizer.encode("Hello there")


def test_http_server_tools_resources_and_errors(llm, server):
    async def session():
        async with Client(f"{server.url}/mcp") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            answer = await call_chat(client, **SEEDED, temperature=1.0)
            completion = await client.call_tool("complete", {"prompt": "Once", "seed": 2})
            models = (await client.call_tool("list_models", {})).structured_content
            embed = await client.call_tool("embed", {"texts": ["a"]})
            too_long = await client.call_tool("chat", {**SEEDED, "max_tokens": 100_000})
            resources = (await client.list_resources()).resources
            manifest = await client.read_resource(f"relaxlm://models/{MODEL}/manifest")
            return tools, answer, completion, models, embed, too_long, resources, manifest

    tools, answer, completion, models, embed, too_long, resources, manifest = asyncio.run(session())
    assert TOOLS <= set(tools)
    assert "messages" in tools["chat"].input_schema["properties"]
    http = chat(server, **SEEDED, temperature=1.0).json()
    assert answer == http["choices"][0]["message"]["content"]
    body = {"model": MODEL, "prompt": "Once", "seed": 2}
    text = requests.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert completion.content[0].text == text["choices"][0]["text"]

    assert models["models"][0]["id"] == MODEL
    assert models["models"][0]["context_window"] == llm.manifest.context_window
    # Errors are tool errors with the reason, and the session goes on.
    assert embed.is_error and "embedding model" in embed.content[0].text
    assert too_long.is_error and "context window" in too_long.content[0].text
    assert {str(r.uri) for r in resources} >= {f"relaxlm://models/{MODEL}/manifest"}
    assert json.loads(manifest.contents[0].text) == json.loads(llm.manifest.to_json())


# -- relaxlm as an MCP client ------------------------------------------------------------------


def test_forced_mcp_tool_runs_through_the_session(server):
    response = chat(server, tool_choice=forced("add"), max_tokens=40, seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    [call] = body["mcp_trace"]
    assert (call["server"], call["tool"], call["round"]) == ("adder", "add", 0)
    arguments = json.loads(call["arguments"])  # grammar-constrained: always valid
    assert call["result"] == str(arguments["a"] + arguments["b"])
    assert not call["is_error"]
    # After the result the model answered (tool_choice is lifted after the forced round).
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert not choice["message"]["tool_calls"]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    errors = body["mcp_errors"]
    assert any("'missing' is unavailable" in e for e in errors)
    assert any("'offline' is unavailable" in e for e in errors)


def test_mcp_tool_over_http(server):
    """The HTTP server's `add` clashes with the stdio one: it is offered as `web__add`."""
    body = chat(server, tool_choice=forced("web__add"), max_tokens=40, seed=5).json()
    [call] = body["mcp_trace"]
    assert (call["server"], call["tool"]) == ("web", "web__add")
    arguments = json.loads(call["arguments"])
    assert call["result"] == str(arguments["a"] + arguments["b"]) and not call["is_error"]


def test_streamed_tool_loop_reports_progress(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Add 2 and 3."}],
        "tool_choice": forced("add"),
        "max_tokens": 40,
        "seed": 4,
        "stream": True,
    }
    with requests.post(
        f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    events = [c["mcp_event"] for c in chunks if "mcp_event" in c]
    kinds = [e["type"] for e in events]
    # The unavailable servers, then the call of add and its result.
    assert kinds == ["error", "error", "tool_call", "tool_result"]
    call, result = events[2], events[3]
    arguments = json.loads(call["arguments"])
    assert result["tool"] == "add" and result["result"] == str(arguments["a"] + arguments["b"])
    # The answer after the result streams as content; it ends with a finish reason.
    after = chunks[[c.get("mcp_event") for c in chunks].index(result) + 1 :]
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in after)
    assert after[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_crashing_mcp_server_is_an_error_in_the_response(server):
    response = chat(server, tool_choice=forced("divide"), max_tokens=40, seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    [call] = body["mcp_trace"]
    assert call["tool"] == "divide" and call["is_error"]
    assert "'divide'" in call["result"] and "failed" in call["result"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    # The server goes on serving, the other MCP server's tools included.
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    again = chat(server, tool_choice=forced("add"), max_tokens=40, seed=3).json()
    assert not again["mcp_trace"][0]["is_error"]


def test_client_tools_go_back_to_the_client(server):
    lookup = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"key": {"type": "string", "maxLength": 8}},
                "required": ["key"],
            },
        },
    }
    response = chat(server, tools=[lookup], tool_choice=forced("lookup"), max_tokens=40, seed=3)
    body = response.json()
    assert response.status_code == 200, body
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert body["mcp_trace"] == []


def test_request_errors_keep_their_status(server):
    response = chat(server, tool_choice=forced("no_such_tool"))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tool_choice"


def test_mcp_endpoint_needs_the_api_key(llm):
    options = ServerOptions(served_model_name=MODEL, mcp=True, api_key="secret")
    with BackgroundServer(create_app(llm, options)) as s:
        assert requests.post(f"{s.url}/mcp", json={}, timeout=10).status_code == 401

        async def session():
            headers = {"Authorization": "Bearer secret"}
            async with httpx2.AsyncClient(headers=headers) as http:
                transport = streamable_http_client(f"{s.url}/mcp", http_client=http)
                async with Client(transport) as client:
                    return {t.name for t in (await client.list_tools()).tools}

        assert TOOLS <= asyncio.run(session())


# -- the loop and the config alone --------------------------------------------------------------


def test_tool_loop_stops_after_max_tool_rounds(mcp_config):
    """A model that only ever calls `add`: the loop runs it max_tool_rounds times, then stops."""
    requests_seen: list[schemas.ChatCompletionRequest] = []

    async def always_add(request: schemas.ChatCompletionRequest) -> schemas.ChatCompletionResponse:
        requests_seen.append(request)
        call = {"id": f"c{len(requests_seen)}", "type": "function"}
        call["function"] = {"name": "add", "arguments": json.dumps({"a": 1, "b": 2})}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
        return schemas.ChatCompletionResponse(
            id="x", created=0, model="m", choices=[choice], usage=usage
        )

    async def run():
        async with AsyncExitStack() as stack:
            tools = McpTools([s for s in load_config(mcp_config) if s.name == "adder"])
            await tools.connect(stack)
            request = {"model": "m", "messages": [{"role": "user", "content": "go"}]}
            request["tool_choice"] = forced("add")
            request = schemas.ChatCompletionRequest.model_validate(request)
            return await chat_with_tools(request, always_add, tools, 2)

    response = asyncio.run(run())
    assert [c.result for c in response.mcp_trace] == ["3", "3"]
    assert len(requests_seen) == 3
    assert requests_seen[0].tool_choice.model_dump() == forced("add")
    assert requests_seen[1].tool_choice == "auto"  # forced once, then the model's choice
    assert [m.role for m in requests_seen[2].messages] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
    ]
    assert requests_seen[0].tools[0].function.name == "add"
    assert response.usage.total_tokens == 15
    assert "max_tool_rounds=2" in response.mcp_errors[0]


def test_mcp_tool_names_become_openai_function_names():
    taken: dict = {}
    for server, tool in [("a", "add"), ("b", "add"), ("c", "search/web"), ("d", "x" * 80)]:
        name = _function_name(server, tool, taken)
        taken[name] = None
    assert list(taken) == ["add", "b__add", "search_web", "x" * 64]


@pytest.mark.parametrize(
    "config, message",
    [
        ("{", "not valid JSON"),
        ('{"servers": {}}', "mcpServers"),
        ('{"mcpServers": {"x": {}}}', "exactly one of 'command'"),
        ('{"mcpServers": {"x": {"url": "ftp://host"}}}', "http:// or https://"),
        ('{"mcpServers": {"x": {"command": "a", "args": "b"}}}', "mcpServers.x.args"),
    ],
)
def test_bad_mcp_config_names_the_problem(tmp_path, config, message):
    path = tmp_path / "mcp.json"
    path.write_text(config)
    with pytest.raises(RelaxlmError, match=message.replace("(", r"\(")):
        load_config(path)

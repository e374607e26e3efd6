"""The server against hostile and sloppy clients (issue 26): every input gets a 4xx in OpenAI's
shape, never a 5xx; a huge body does not stall other streams; loopback servers refuse foreign
Host and Origin headers on every route. A uvicorn server on loopback, real HTTP requests."""

import json
import socket
import threading
import time

import pytest
import requests
from hf_models import make_model

import relaxlm
from relaxlm.server.app import ServerOptions, create_app
from relaxlm.server.background import BackgroundServer
from relaxlm.server.guards import MAX_JSON_DEPTH, json_depth

MODEL = "tiny-chat"
KEY = "test-key"
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> relaxlm.LLM:
    folder = make_model(
        tmp_path_factory.mktemp("chat"), tokenizer="bpe", seed=7, max_position_embeddings=1024
    )
    return relaxlm.LLM(str(folder), max_batch_size=8)


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(create_app(llm, ServerOptions(served_model_name=MODEL))) as s:
        yield s


def post(server, body, path: str = "/v1/chat/completions", **kwargs) -> requests.Response:
    if not isinstance(body, dict):
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return requests.post(
            f"{server.url}{path}", data=body, headers=headers, timeout=60, **kwargs
        )
    return requests.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def assert_error(r: requests.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


def chunked_post_status(server, chunks: int, size: int) -> int:
    """The status of a chat request whose body is sent in `chunks` chunks of `size` bytes,
    without a Content-Length; sending stops once the server has answered."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(chunks):
                sock.sendall(b"%x\r\n%s\r\n" % (size, b"x" * size))
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while we sent
            pass
        return int(sock.recv(64).split(b" ")[1])


# -- the body: nesting depth, size ------------------------------------------------------------


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[{{"}], "c": "\\"]]"}') == 3
    assert json_depth(b"[" * 500 + b"]" * 500) == 500
    assert json_depth(b"") == 0


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 480, 5000])
def test_deeply_nested_json_is_a_400_even_in_an_ignored_field(server, depth):
    head = (
        b'{"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]'
    )
    body = head + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    error = assert_error(post(server, body), 400)
    assert error["code"] == "json_too_deep" and str(MAX_JSON_DEPTH) in error["message"]
    # The connection was answered, not reset; and nesting within the limit is served.
    ok = head + b', "x": ' + b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2) + b"}"
    assert post(server, ok).status_code == 200


def test_oversized_bodies_get_a_413_at_once_and_streams_keep_going(llm):
    app = create_app(llm, ServerOptions(served_model_name=MODEL, max_body_bytes=1 << 20))
    with BackgroundServer(app) as s:
        body = {"model": MODEL, "messages": USER, "max_tokens": 300, "ignore_eos": True}
        gaps, done = [], threading.Event()

        def stream():  # the time between events of a stream running meanwhile
            with requests.post(
                f"{s.url}/v1/chat/completions", json={**body, "stream": True}, stream=True
            ) as r:
                last = time.monotonic()
                for line in r.iter_lines():
                    if line:
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now
            done.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        while not gaps:
            time.sleep(0.01)
        huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 10**7}]})
        started = time.monotonic()
        error = assert_error(post(s, huge.encode()), 413)  # by its Content-Length
        assert time.monotonic() - started < 2.0 and error["code"] == "request_too_large"

        assert chunked_post_status(s, 100, 100_000) == 413  # no Content-Length
        streamer.join(timeout=120)
        assert done.is_set() and len(gaps) > 100
        assert max(gaps[1:]) < 1.0, max(gaps[1:])  # no event waited on the big bodies
        # A body just under the limit is read and answered.
        r = post(s, json.dumps({**body, "max_tokens": 2, "user": "u" * 900_000}).encode())
        assert r.status_code == 200, r.text


# -- Host, Origin, docs, keys -----------------------------------------------------------------


def raw_get(server, path: str, host: bytes, extra: bytes = b"") -> int:
    """The status of a GET sent with exactly the Host header given."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(
            b"GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n"
            % (path.encode(), host, extra)
        )
        return int(sock.recv(64).split(b" ")[1])


def test_loopback_server_refuses_foreign_hosts_and_origins_on_every_route(llm):
    app = create_app(llm, ServerOptions(served_model_name=MODEL, mcp=True))
    with BackgroundServer(app) as s:
        for path in ("/v1/models", "/health", "/metrics", "/openapi.json", "/mcp"):
            assert raw_get(s, path, b"evil.example:%d" % s.port) == 421, path
            assert raw_get(s, path, b"127.0.0.1.evil.example") == 421, path
            origin = b"Origin: http://evil.example\r\n"
            assert raw_get(s, path, b"127.0.0.1:%d" % s.port, origin) == 403, path
        for host in (b"127.0.0.1:%d" % s.port, b"localhost", b"[::1]:80"):
            assert raw_get(s, "/v1/models", host) == 200, host
        own = b"Origin: http://localhost:%d\r\n" % s.port
        assert raw_get(s, "/v1/models", b"localhost:%d" % s.port, own) == 200
        r = requests.get(f"{s.url}/v1/models", headers={"Host": "evil.example"}, timeout=10)
        assert_error(r, 421)
    # Bound to every interface, any name may reach it.
    with BackgroundServer(
        create_app(llm, ServerOptions(served_model_name=MODEL, host="0.0.0.0"))
    ) as s:
        assert raw_get(s, "/v1/models", b"my-server.lan:%d" % s.port) == 200


def test_docs_pages_are_off_and_the_key_guards_metrics_and_openapi(llm, server):
    for path in ("/docs", "/redoc"):  # they would load scripts from a CDN
        assert requests.get(f"{server.url}{path}", timeout=10).status_code == 404
    keyed = {"Authorization": f"Bearer {KEY}"}
    with BackgroundServer(
        create_app(llm, ServerOptions(served_model_name=MODEL, api_key=KEY))
    ) as s:
        for path in ("/metrics", "/openapi.json"):
            assert_error(requests.get(f"{s.url}{path}", timeout=10), 401)
            assert requests.get(f"{s.url}{path}", headers=keyed, timeout=10).status_code == 200
        assert requests.get(f"{s.url}/health", timeout=10).status_code == 200
    options = ServerOptions(served_model_name=MODEL, api_key=KEY, open_metrics=True)
    with BackgroundServer(create_app(llm, options)) as s:
        assert requests.get(f"{s.url}/metrics", timeout=10).status_code == 200
        assert_error(requests.get(f"{s.url}/openapi.json", timeout=10), 401)


def test_a_model_and_the_model_list_agree(server, llm):
    listed = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    one = requests.get(f"{server.url}/v1/models/{MODEL}", timeout=10).json()
    assert one == listed and one["max_model_len"] == llm.manifest.context_window


# -- fields: strict types, token ids, other servers' fields -----------------------------------

BASE = {"model": MODEL, "messages": USER, "max_tokens": 2}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"²": 1}}, "logit_bias"),  # str.isdigit() is True, int() refuses it
        ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),  # past int()'s 4300-digit limit
        ({"logit_bias": {"100000": 1}}, "logit_bias"),  # outside the vocabulary
        ({"max_tokens": True}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"temperature": "0.5"}, "temperature"),
        ({"n": 1.5}, "n"),
        ({"seed": True}, "seed"),
        ({"stop_token_ids": [10**30]}, "stop_token_ids.0"),
        ({"stop_token_ids": [100000]}, "stop_token_ids"),  # outside the vocabulary
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"guided_choice": ["yes", "no"]}, "guided_choice"),
        ({"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
    ],
)
def test_wrong_types_and_ids_are_400s_naming_the_field(server, fields, param):
    error = assert_error(post(server, {**BASE, **fields}), 400, param)
    if param.startswith("guided_"):
        assert "response_format" in error["message"]


def test_what_strict_types_still_take(server):
    # An integer where a number goes, null for the default, other unknown fields ignored.
    body = {**BASE, "temperature": 0, "top_p": 1, "stop": None, "n": None, "metadata": {"a": 1}}
    assert post(server, {**body, "n": 1.0, "max_tokens": 2.0}).status_code == 200  # JSON: 1.0 == 1
    assert post(server, {**body, "guided_json": None}).status_code == 200
    r = post(server, {"model": MODEL, "prompt": [5, 6], "max_tokens": 2}, path="/v1/completions")
    assert r.status_code == 200, r.text


def test_prompt_text_too_long_for_any_tokenization_is_refused_before_tokenizing(server, llm):
    chars = llm.manifest.context_window * 32 + 1
    r = post(server, {**BASE, "messages": [{"role": "user", "content": "a" * chars}]})
    assert assert_error(r, 400, "messages")["code"] == "context_length_exceeded"
    r = post(server, {"model": MODEL, "prompt": ["a" * chars]}, path="/v1/completions")
    assert assert_error(r, 400, "prompt")["code"] == "context_length_exceeded"


# -- admission and the KV cache ----------------------------------------------------------------


def test_max_waiting_holds_for_a_burst(llm):
    # 8 batch slots and 1 waiting place: of 64 requests at once, the first 9 are taken.
    app = create_app(llm, ServerOptions(served_model_name=MODEL, max_waiting=1))
    body = {"model": MODEL, "messages": USER, "max_tokens": 64, "ignore_eos": True}
    with BackgroundServer(app) as s:
        statuses = []
        barrier = threading.Barrier(64)

        def send():
            barrier.wait()
            statuses.append(post(s, body).status_code)

        threads = [threading.Thread(target=send) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert set(statuses) <= {200, 429} and len(statuses) == 64
    assert statuses.count(429) >= 32, statuses.count(429)


def test_a_request_the_kv_cache_cannot_hold_is_refused_not_cut_short(llm):
    small = relaxlm.LLM(str(llm.artifact), max_batch_size=2, kv_cache_tokens=512)
    with BackgroundServer(create_app(small, ServerOptions(served_model_name=MODEL))) as s:
        messages = [{"role": "user", "content": "cat dog " * 60}]
        body = {"model": MODEL, "messages": messages, "ignore_eos": True}
        error = assert_error(post(s, {**body, "max_tokens": 600}), 400, "max_tokens")
        assert error["code"] == "context_length_exceeded" and "KV cache" in error["message"]
        # Without max_tokens, the default is what the cache holds: a plain "length" stop.
        out = post(s, body).json()
        usage = out["usage"]
        assert out["choices"][0]["finish_reason"] == "length"
        m = small.metrics()  # 512 tokens, rounded up to whole pages
        assert usage["total_tokens"] <= m.kv_pages_total * m.page_size
        assert usage["completion_tokens"] > 1
        room = int(error["message"].split("at most ")[1].split(",")[0])
        assert usage["completion_tokens"] == room
        assert post(s, {**body, "max_tokens": room}).status_code == 200

"""Engine replicas on Ray behind one OpenAI endpoint (relaxlm/replicas.py): a local Ray cluster
started here (loopback only, 2 CPUs), 2 replicas of a tiny random-weight Llama, served by the
usual app and driven by the official `openai` client. The oracles are the same requests on one
in-process engine (greedy, so the text must be equal), its prefix-cache hits, and /metrics.
Every wait has a timeout: a hang fails the test instead of stalling the suite."""

import asyncio
import json
import os
import signal
import time

import openai
import pytest
import requests
from hf_models import make_model
from test_lora_slots import _make_adapter

import relaxlm
from relaxlm.cli import main
from relaxlm.replicas import PrefixRouter, ReplicaSet
from relaxlm.server.app import ServerOptions, create_app
from relaxlm.server.background import BackgroundServer
from relaxlm.testing.servers import relaxlm_serve

MODEL = "tiny-replicas"
REQUEST_TIMEOUT_S = 60  # one request, start to end


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Wider than the usual tiny model (~25 ms a step of 8 on one thread): an answer must still
    be running when its replica is killed, well after the driver has read its first tokens."""
    return make_model(
        tmp_path_factory.mktemp("replicas"),
        tokenizer="bpe",
        seed=7,
        max_position_embeddings=512,
        hidden_size=768,
        intermediate_size=2304,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )


@pytest.fixture(scope="module")
def llm(folder) -> relaxlm.LLM:
    """The single-engine oracle; its artifact (with 2 LoRA adapter slots) is what the replicas
    load."""
    return relaxlm.LLM(str(folder), max_batch_size=8, threads=1, lora_slots=2, lora_max_rank=4)


@pytest.fixture(scope="module")
def adapters(folder, tmp_path_factory):
    """A random PEFT adapter for the model, and one of a rank the slots cannot take."""
    root = tmp_path_factory.mktemp("replica-adapters")
    return {
        "a": _make_adapter(folder, root / "a", 3, ["q_proj", "v_proj", "down_proj"]),
        "rank8": _make_adapter(folder, root / "rank8", 4, ["q_proj"], r=8),
    }


@pytest.fixture(scope="module")
def cluster():
    # Loopback only: Ray reads this when imported (see relaxlm/replicas.py).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False
    )
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def replicas(cluster, llm):
    replicas = ReplicaSet(
        llm.artifact,
        2,
        max_batch_size=8,
        threads=1,
        health_interval_s=0.25,
        health_timeout_s=10,  # a replica stopped (SIGSTOP) below is killed after this
        start_timeout_s=120,
    )
    yield replicas
    replicas.shutdown()


@pytest.fixture(scope="module")
def server(replicas):
    with BackgroundServer(create_app(replicas, ServerOptions(served_model_name=MODEL))) as s:
        yield s


def _client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )


async def _stream(
    client, messages, max_tokens: int, on_content=None, full=False, model=MODEL
) -> str:
    """The streamed answer's text; full: all max_tokens (ignore_eos)."""

    async def run() -> str:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True} if full else None,
        )
        pieces = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not pieces and on_content is not None:
                    on_content()
                pieces.append(chunk.choices[0].delta.content)
        return "".join(pieces)

    return await asyncio.wait_for(run(), REQUEST_TIMEOUT_S)


def _oracle(llm, conversations, max_tokens: int, full=False, lora=None) -> list[str]:
    """One engine's greedy answers, generated together."""
    params = relaxlm.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=full, lora=lora
    )
    return [r.text for r in llm.generate(conversations, params)]


def _metrics(server) -> dict[str, float]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _settled(server, finished: float, timeout: float = 20) -> dict[str, float]:
    """/metrics once the replicas' health checks reported `finished` requests in all."""
    deadline = time.monotonic() + timeout
    while (m := _metrics(server))["relaxlm_requests_finished_total"] < finished:
        assert time.monotonic() < deadline, f"/metrics still reports {m}"
        time.sleep(0.1)
    return m


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_prefix_router_keeps_a_prefix_on_its_replica_until_that_one_is_loaded():
    router = PrefixRouter(block=4, slack=2)
    turn1 = list(range(10))  # two full blocks
    first = router.choose(turn1, {0: 0, 1: 0})
    router.record(turn1, first)
    other = 1 - first
    turn2 = turn1 + [11, 12, 13, 14]
    assert router.choose(turn2, {first: 2, other: 0}) == first  # within the slack
    assert router.choose(turn2, {first: 3, other: 0}) == other  # too loaded: spill
    assert router.choose(turn2, {other: 5}) == other  # `first` is down
    assert router.choose([99, 98, 97, 96, 95], {first: 1, other: 0}) == other  # no prefix
    assert router.choose([1, 2, 3], {first: 1, other: 0}) == other  # shorter than a block
    router.forget(first)  # restarted, cache empty: the least loaded takes it
    assert router.choose(turn2, {first: 1, other: 0}) == other
    bounded = PrefixRouter(block=1, slack=0, capacity=3)
    bounded.record(list(range(10)), 0)
    assert len(bounded._owner) == 3


def test_64_concurrent_streams_equal_one_engine_and_metrics_sum_the_replicas(server, replicas, llm):
    conversations = [_user(f"Story {i}: tell me about the cat and item {i}.") for i in range(64)]
    want = _oracle(llm, conversations, 16)
    before = _metrics(server)["relaxlm_requests_finished_total"]

    async def run():
        client = _client(server)
        return await asyncio.gather(*(_stream(client, m, 16) for m in conversations))

    got = asyncio.run(run())
    assert got == want
    assert sum(len(set(t)) > 1 for t in want) > 32  # the oracle's texts are not degenerate
    m = _settled(server, before + 64)
    assert m["relaxlm_requests_finished_total"] == before + 64
    per_replica = replicas.replica_metrics()
    assert all(r.requests_finished > 0 for r in per_replica)  # both served some
    assert sum(r.requests_finished for r in per_replica) == m["relaxlm_requests_finished_total"]
    assert m["relaxlm_kv_pages_total"] == sum(r.kv_pages_total for r in per_replica)


def test_prefix_affine_routing_hits_the_cache_as_one_engine_does(server, llm):
    """Conversations of 3 turns, sent in order: every turn after the first finds its prefix on
    the replica that computed it, so the replicas' prefix-cache hits equal those of one fresh
    engine given the same requests (a replica chosen without regard to the prefix would miss,
    on average, half of them)."""
    fresh = relaxlm.LLM(llm.artifact, max_batch_size=8, threads=1)
    # A distinct start per conversation: no full page is shared with any earlier prompt.
    conversations = [
        _user(f"{i * 7919:05d} asks: what does the old engineer build?") for i in range(5)
    ]
    turns = []
    params = relaxlm.SamplingParams(max_tokens=12, temperature=0)
    for _ in range(3):
        replies = [fresh.chat(m, params).text for m in conversations]  # in order
        turns.append(conversations)
        conversations = [
            [*m, {"role": "assistant", "content": r}, {"role": "user", "content": "And then?"}]
            for m, r in zip(conversations, replies, strict=True)
        ]
    want_hits = fresh.metrics().prefix_cache_hit_tokens
    assert want_hits > 0

    before = _metrics(server)

    async def run():
        client = _client(server)
        for turn in turns:
            for messages in turn:  # in order, as a user would
                await _stream(client, messages, 12)

    asyncio.run(run())
    after = _settled(server, before["relaxlm_requests_finished_total"] + 15)
    hits = (
        after["relaxlm_prefix_cache_hit_tokens_total"]
        - before["relaxlm_prefix_cache_hit_tokens_total"]
    )
    assert hits == want_hits


def test_structured_output_crosses_to_the_replicas(server, llm):
    """response_format's grammar reaches the replica (it pickles as its recipe) and constrains
    the answer as on one engine."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    messages = _user("Give me a name as JSON.")
    with BackgroundServer(create_app(llm, ServerOptions(served_model_name=MODEL))) as single:
        answers = []
        for url in (server.url, single.url):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            out = client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=40,
                temperature=0,
                response_format=response_format,
                timeout=REQUEST_TIMEOUT_S,
            )
            answers.append(out.choices[0].message.content)
    assert answers[0] == answers[1]
    assert set(json.loads(answers[0])) == {"name"}


def test_a_replica_killed_mid_run_fails_or_retries_cleanly_and_comes_back(server, replicas, llm):
    conversations = [_user(f"Run {i}: a long story about the robot, please.") for i in range(32)]
    # 16 a replica: 8 answer (64 tokens, ~1.6 s) while 8 wait for a batch slot.
    want = _oracle(llm, conversations, 64, full=True)
    victim = 0
    old_pid = replicas.replica_pids()[victim]
    retries_before = replicas.retries
    finished_before = _metrics(server)["relaxlm_requests_finished_total"]

    async def run():
        client = _client(server)
        streaming = 0
        enough = asyncio.Event()

        def started():
            nonlocal streaming
            streaming += 1
            if streaming >= 12:  # so at least 4 on each replica (8 run at once on each)
                enough.set()

        async def one(messages):
            try:
                return await _stream(client, messages, 64, started, full=True)
            except openai.APIError as e:
                return e

        tasks = [asyncio.ensure_future(one(m)) for m in conversations]
        await asyncio.wait_for(enough.wait(), REQUEST_TIMEOUT_S)
        os.kill(old_pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 2 * REQUEST_TIMEOUT_S)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, Exception)]
    for result, expected in zip(results, want, strict=True):
        if not isinstance(result, Exception):
            assert result == expected  # completed, or retried elsewhere before any output
    for e in errors:  # those that were streaming on the victim: a clean 503 in the stream
        assert e.body["type"] == "server_error" and e.body["code"] == "unavailable", e.body
        assert f"replica {victim} failed while answering" in e.message
    assert errors, "the victim had requests streaming when it was killed"
    assert replicas.retries > retries_before, "the victim's queued requests were retried"
    assert len(errors) < len(results)

    deadline = time.monotonic() + 90  # Ray restarts it; the health check sees it up again
    while replicas.replica_pids()[victim] in (None, old_pid):
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(0.2)
    assert replicas.num_up() == 2
    # Counters never go backwards across the restart.
    assert _metrics(server)["relaxlm_requests_finished_total"] >= finished_before

    # New conversations (no cached prefix anywhere) spread by load: the victim takes its share.
    again = [_user(f"After {i}: what does the robot find?") for i in range(16)]

    async def rerun():
        client = _client(server)
        return await asyncio.gather(*(_stream(client, m, 16) for m in again))

    assert asyncio.run(rerun()) == _oracle(llm, again, 16)
    deadline = time.monotonic() + 20
    while not replicas.replica_metrics()[victim].requests_finished:
        assert time.monotonic() < deadline, "the restarted replica took no request"
        time.sleep(0.1)


def test_cli_refuses_a_ray_address_without_replicas(capsys):
    assert main(["serve", "unused-model", "--ray-address", "auto"]) == 2
    assert "--ray-address needs --replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "unused-model", "--replicas", "0"])


def test_a_client_that_leaves_aborts_its_request_on_the_replica(server, replicas):
    aborted = sum(m.requests_aborted for m in replicas.replica_metrics())
    body = {"model": MODEL, "messages": _user("Leave 1: a story."), "max_tokens": 400}
    body |= {"stream": True, "ignore_eos": True}
    with requests.post(
        f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT_S
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
        next(line for line in lines if b'"content":"' in line and b'"content":""' not in line)
    deadline = time.monotonic() + 20  # closed mid-answer: aborted there, its pages freed
    while True:
        now = replicas.replica_metrics()
        if sum(m.requests_aborted for m in now) == aborted + 1 and not any(m.running for m in now):
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert all(m.kv_pages_used == m.kv_pages_cached for m in now)


def test_a_hung_replica_is_killed_by_the_health_check_and_its_queued_requests_retried(
    server, replicas, llm
):
    victim = 1
    old_pid = replicas.replica_pids()[victim]
    retries = replicas.retries
    os.kill(old_pid, signal.SIGSTOP)  # alive to Ray, but answers nothing
    conversations = [_user(f"Hang {i}: what does the café owner paint?") for i in range(8)]

    async def run():
        client = _client(server)
        return await asyncio.gather(*(_stream(client, m, 16) for m in conversations))

    try:
        # Half are routed to the stopped replica until its health check fails; they had
        # received nothing, so they are retried on the other one once it is killed.
        assert asyncio.run(run()) == _oracle(llm, conversations, 16)
    finally:
        if replicas.replica_pids()[victim] == old_pid:
            os.kill(old_pid, signal.SIGCONT)
    assert replicas.retries > retries
    deadline = time.monotonic() + 90
    while replicas.replica_pids()[victim] in (None, old_pid):
        assert time.monotonic() < deadline, "the hung replica was not replaced"
        time.sleep(0.2)


def _spread(server, conversations, model: str) -> list[str]:
    """Greedy answers to `conversations` sent at once: the least loaded replica takes each
    new prompt, so they spread over the replicas."""

    async def run():
        client = _client(server)
        return await asyncio.gather(*(_stream(client, m, 12, model=model) for m in conversations))

    return asyncio.run(run())


def _lora_post(url: str, action: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/{action}_lora_adapter", json=body, timeout=REQUEST_TIMEOUT_S)


def _served(url: str) -> set[str]:
    return {m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}


def test_lora_adapters_load_on_every_replica_and_are_back_after_a_restart(
    server, replicas, llm, adapters
):
    refused = _lora_post(server.url, "load", lora_name="big", lora_path=str(adapters["rank8"]))
    assert refused.status_code == 400 and "rank 8" in refused.text, refused.text
    assert _served(server.url) == {MODEL} and replicas.loras() == {}
    loaded = _lora_post(server.url, "load", lora_name="a", lora_path=str(adapters["a"]))
    assert loaded.status_code == 200, loaded.text
    assert _served(server.url) == {MODEL, "a"}
    llm.load_lora("a", adapters["a"])  # the oracle: one engine with the adapter
    try:
        talks = [_user(f"Adapter {i}: what does the lighthouse keeper see?") for i in range(8)]
        want = _oracle(llm, talks, 12, lora="a")
        base = _oracle(llm, talks, 12)
        assert sum(a != b for a, b in zip(want, base, strict=True)) >= 4  # the adapter matters
        before = [m.requests_finished for m in replicas.replica_metrics()]
        assert _spread(server, talks, "a") == want
        deadline = time.monotonic() + 20  # each replica answered some with the adapter
        while any(
            m.requests_finished <= b
            for m, b in zip(replicas.replica_metrics(), before, strict=True)
        ):
            assert time.monotonic() < deadline, replicas.replica_metrics()
            time.sleep(0.1)

        # Ray restarts a killed replica with its constructor's arguments: the front loads the
        # adapter into it again before it takes requests.
        victim = 0
        old_pid = replicas.replica_pids()[victim]
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while replicas.replica_pids()[victim] in (None, old_pid) or replicas.num_up() < 2:
            assert time.monotonic() < deadline, "the killed replica did not come back"
            time.sleep(0.2)
        again = [_user(f"Restart {i}: what does the lighthouse keeper hear?") for i in range(8)]
        assert _spread(server, again, "a") == _oracle(llm, again, 12, lora="a")
        deadline = time.monotonic() + 20
        while not replicas.replica_metrics()[victim].requests_finished:
            assert time.monotonic() < deadline, "the restarted replica took no request"
            time.sleep(0.1)
    finally:
        llm.unload_lora("a")
    assert _lora_post(server.url, "unload", lora_name="a").status_code == 200
    assert _served(server.url) == {MODEL} and replicas.loras() == {}
    gone = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "a", "messages": _user("Still there?"), "max_tokens": 4},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert gone.status_code == 404, gone.text


def test_relaxlm_serve_replicas_command(llm, adapters):
    """`relaxlm serve --replicas 1 --lora a=DIR`: the command starts its own local Ray and
    serves the model and the adapter through it."""
    options = ["--replicas", "1", "--threads", "1", "--max-batch", "8"]
    options += ["--lora", f"a={adapters['a']}", "--lora-max-rank", "4"]
    conversations = [_user(f"Command {i}: what does the compiler test?") for i in range(4)]
    llm.load_lora("a", adapters["a"])
    try:
        want = {m: _oracle(llm, conversations, 16, lora=m) for m in (None, "a")}
    finally:
        llm.unload_lora("a")
    with relaxlm_serve(str(llm.artifact), *options, "--served-model-name", MODEL) as url:
        assert _served(url) == {MODEL, "a"}

        async def run(model):
            client = openai.AsyncOpenAI(
                base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
            )
            return await asyncio.gather(
                *(_stream(client, m, 16, model=model) for m in conversations)
            )

        assert asyncio.run(run(MODEL)) == want[None]
        assert asyncio.run(run("a")) == want["a"]

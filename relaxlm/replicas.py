"""Replicas of one model on a Ray cluster, behind one AsyncLLM-like face (`ReplicaSet`), so the
OpenAI server serves them as it serves one engine: `relaxlm serve MODEL --replicas N`.

    replicas = ReplicaSet("artifacts/x", 2, max_batch_size=8)   # Ray started here, or joined
    app = create_app(replicas)                                   # one endpoint in front

Each replica is a Ray actor holding an `AsyncLLM` (its own engine, KV cache and prefix cache);
outputs come back as a Ray streaming generator, one RequestOutput per engine step. Here, on the
caller's side, are what the replicas share:

- routing (`PrefixRouter`): a request goes to the replica that computed the longest prefix of
  its prompt, so a conversation's next turn finds its KV pages cached; on load, the least
  loaded replica takes it instead.
- requests are checked here (the same checks as `LLM.check`, from the replicas' limits), so a
  bad request is refused before it streams.
- failures: a replica that dies is restarted by Ray (`max_restarts`), and one that stops
  answering its health check is killed first. Its requests that had received nothing yet are
  retried on another replica; those already streaming end with `Unavailable` (a 503).
- metrics: the replicas' snapshots, taken by the health check, summed (a restarted replica's
  counters carry on from its last snapshot, so totals never go backwards).
- LoRA adapters (an artifact with slots): loaded into and unloaded from every replica at once,
  and into a restarted one before it takes requests, so a request may name an adapter whichever
  replica it reaches. Routing keys a prefix by its adapter too (its KV pages are the adapter's).

Ray is an optional dependency (`pip install 'relaxlm[ray]'`). Every node must see the artifact
at the same path (a shared file system, or a copy on each).
"""

import asyncio
import dataclasses
import logging
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from relaxlm.artifacts import Manifest
from relaxlm.errors import RelaxlmError, Unavailable
from relaxlm.runtime.chat_template import render_chat
from relaxlm.runtime.engine import RequestOutput
from relaxlm.runtime.lora import LoadedLora
from relaxlm.runtime.metrics import EngineMetrics, Histogram
from relaxlm.runtime.sampler import SamplingParams
from relaxlm.runtime.scheduler import Scheduler, SchedulerConfig
from relaxlm.runtime.tokenizer import Tokenizer
from relaxlm.sdk import LLM, AsyncLLM, Messages, Prompt, _artifact_folder

logger = logging.getLogger(__name__)

# LLM's keywords that choose the artifact (resolved here, once); the rest go to each replica.
_ARTIFACT_OPTIONS = ("quant", "dtype", "lora", "gpu_layers")  # used up by the compile
LORA_TIMEOUT_S = 120.0  # a replica loads or unloads an adapter between two engine steps


class _Replica:
    """One engine replica, as a Ray actor (made remote in ReplicaSet: Ray is imported lazily)."""

    def __init__(self, artifact: str, options: dict):
        self.llm = AsyncLLM(LLM(artifact, **options))
        self.incarnation = uuid.uuid4().hex  # a restart by Ray makes a new one

    def describe(self) -> dict:
        """What the front needs to check requests as the engine would."""
        return {"scheduler": dataclasses.asdict(self.llm.llm.engine.config), **self._who()}

    def health(self) -> tuple[dict, EngineMetrics]:
        """(who, metrics): answers while the actor's event loop is free."""
        return self._who(), self.llm.metrics()

    def _who(self) -> dict:
        return {"incarnation": self.incarnation, "pid": os.getpid()}

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        group = self.llm.generate_many([(prompt_ids, params)], [request_id])
        async with group:
            async for _, output in group:
                yield output

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def load_lora(self, name: str, path: str) -> LoadedLora:
        return await asyncio.to_thread(self.llm.load_lora, name, path)  # waits for a step

    async def unload_lora(self, name: str) -> LoadedLora:
        return await asyncio.to_thread(self.llm.unload_lora, name)

    async def sync_loras(self, adapters: dict[str, str]) -> None:
        """Load those of `adapters` (name -> folder) not loaded here: after a restart, the
        front's adapters (one it sent while this incarnation started may be here already)."""
        for name, path in adapters.items():
            if name not in self.llm.loras():
                await self.load_lora(name, path)


class PrefixRouter:
    """Which replica takes a prompt: the one that computed its longest prefix, in blocks of
    `block` tokens (chained hashes, so a block stands for everything before it), unless that
    replica runs more than `slack` more sequences than the least loaded one, which then takes
    it. Plain data in and out; `capacity` bounds the blocks remembered (least recent go)."""

    def __init__(self, block: int, slack: int, capacity: int = 1 << 16):
        self.block, self.slack, self.capacity = block, slack, capacity
        self._owner: OrderedDict[int, int] = OrderedDict()  # block hash -> replica

    def hashes(self, ids: Sequence[int], lora: str | None = None) -> list[int]:
        """Chained block hashes; a LoRA adapter's prompts chain from their own start (the same
        tokens under another adapter are other KV pages)."""
        out, h = [], 0 if lora is None else hash(lora)
        for start in range(0, len(ids) - self.block + 1, self.block):
            h = hash((h, tuple(ids[start : start + self.block])))
            out.append(h)
        return out

    def choose(self, ids: Sequence[int], loads: dict[int, int], lora: str | None = None) -> int:
        """A replica among `loads` (replica -> sequences in flight; those up only)."""
        assert loads, "no replica to choose from"
        hashes = self.hashes(ids, lora)
        affine = None
        for h in hashes:
            owner = self._owner.get(h)
            if owner is None or owner not in loads:
                break
            affine = owner
        least = min(loads.values())
        if affine is not None and loads[affine] - least <= self.slack:
            return affine
        # Ties go by the first block, so prompts that share one spread the same way.
        first = hashes[0] if hashes else hash(tuple(ids))
        return min(loads, key=lambda r: (loads[r], hash((first, r))))

    def record(self, ids: Sequence[int], replica: int, lora: str | None = None) -> None:
        """`replica` now holds the full blocks of `ids` in its prefix cache."""
        for h in self.hashes(ids, lora):
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: int) -> None:
        """`replica` restarted with an empty cache."""
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]


@dataclasses.dataclass
class _State:
    """What the front knows of one replica."""

    actor: object
    up: bool = False
    incarnation: str | None = None
    pid: int | None = None  # on its node
    in_flight: int = 0  # sequences sent, not yet ended
    metrics: EngineMetrics = dataclasses.field(default_factory=EngineMetrics)
    retired: EngineMetrics = dataclasses.field(default_factory=EngineMetrics)  # dead incarnations
    probe: object = None  # the health call in flight
    probe_sent: float = 0.0
    restarts: int = 0


class ReplicaSet:
    """`num_replicas` engines of one model on Ray, with AsyncLLM's interface (the part the
    server uses): generate_many, waiting, metrics, max_new_tokens, the tokenizer and manifest.

    model: as for `relaxlm.LLM` (a checkpoint is compiled here, once, into the cache).
    ray_address: a running cluster ("auto", "ray://host:10001", "host:6379"); None starts a
        local one on loopback unless this process already joined one (ray.init before).
    health_interval_s: how often each replica is asked for its health and metrics.
    health_timeout_s: an up replica that takes longer to answer is killed (and restarted).
    start_timeout_s: how long the first start of the replicas may take.
    replica_cpus: CPUs Ray reserves for each replica; the engine's threads are `threads`.
    options: LLM's other keywords (max_batch_size, kv_cache_tokens, threads, ...), for every
        replica.
    """

    def __init__(
        self,
        model: str | os.PathLike | None,
        num_replicas: int,
        *,
        ray_address: str | None = None,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 30.0,
        start_timeout_s: float = 600.0,
        replica_cpus: float = 1,
        **options,
    ):
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise RelaxlmError(f"replicas={num_replicas!r} is invalid; set it to an integer >= 1")
        ray = _import_ray(local=ray_address is None)
        self.artifact = _artifact_folder(model, **options)
        self.manifest = Manifest.read(self.artifact)
        if self.manifest.task == "embed":
            raise RelaxlmError(f"{self.artifact} is an embedding model; replicas serve text models")
        self.tokenizer = Tokenizer.from_dir(
            self.artifact / "tokenizer", model_config=self.manifest.model_config
        )
        if not ray.is_initialized():
            try:  # "local": a new cluster, never one that another program started here
                ray.init(address=ray_address or "local")
            except (ConnectionError, ValueError) as e:
                raise RelaxlmError(
                    f"cannot join the Ray cluster at {ray_address!r} ({e}); start one there "
                    "with `ray start --head`, or leave --ray-address out for a local one"
                ) from e
        self._ray = ray
        self._lock = threading.Lock()
        self._lora_lock = threading.Lock()  # one change of the adapters at a time
        self._loras: dict[str, LoadedLora] = {}  # as replica 0 holds them; every replica has them
        self._stop = threading.Event()
        engine_options = {k: v for k, v in options.items() if k not in _ARTIFACT_OPTIONS}
        # Loaded from here, not by each replica's constructor: a replica Ray restarts would
        # get the constructor's adapters only, not those loaded since.
        adapters = engine_options.pop("lora_adapters", None) or {}
        # Ray restarts a dead replica itself; its tasks are not retried (a retry on another
        # replica is decided here, where it is known whether anything was streamed).
        actor = ray.remote(_Replica).options(
            max_restarts=-1, max_task_retries=0, num_cpus=replica_cpus
        )
        self._replicas = [
            _State(actor.remote(str(Path(self.artifact).resolve()), engine_options))
            for _ in range(num_replicas)
        ]
        try:
            described = ray.get(
                [r.actor.describe.remote() for r in self._replicas], timeout=start_timeout_s
            )
        except Exception as e:
            self.shutdown()
            raise RelaxlmError(f"the replicas did not start: {_cause(e)}") from e
        for state, info in zip(self._replicas, described, strict=True):
            state.up, state.incarnation, state.pid = True, info["incarnation"], info["pid"]
        config = SchedulerConfig(**described[0]["scheduler"])
        self._limits = Scheduler(config)  # check() and max_new_tokens() only: pure functions
        self.max_batch_size = config.max_batch_size
        self.router = PrefixRouter(config.page_size, slack=config.max_batch_size)
        self.retries = 0  # requests moved to another replica after theirs died
        for name, path in adapters.items():
            try:
                self.load_lora(name, path)
            except Exception:
                self.shutdown()
                raise
        self._interval, self._timeout = health_interval_s, health_timeout_s
        self._watcher = threading.Thread(target=self._watch, name="relaxlm-replicas", daemon=True)
        self._watcher.start()

    # -- AsyncLLM's interface -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def num_replicas(self) -> int:
        return len(self._replicas)

    def apply_chat_template(self, messages: Messages, tools: list[dict] | None = None) -> str:
        """As LLM.apply_chat_template: the model's own template, with a generation prompt."""
        return render_chat(
            self.tokenizer.chat_template,
            messages,
            add_generation_prompt=True,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            tools=tools or None,
        )

    def check(self, prompt: Prompt | Messages, params: SamplingParams | None = None) -> list[int]:
        """As LLM.check, from the replicas' limits: the prompt's ids, or RelaxlmError."""
        params = params or SamplingParams()
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            text = self.apply_chat_template(prompt)
            prompt = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise RelaxlmError("the prompt is empty; pass at least one token")
        vocab, window = self.vocab_size, self.manifest.context_window
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise RelaxlmError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        if len(ids) > window:
            raise RelaxlmError(
                f"the prompt has {len(ids)} tokens, more than the model's context window of "
                f"{window}; shorten it"
            )
        if bad := [t for t in params.logit_bias if not t < vocab]:
            raise RelaxlmError(
                f"SamplingParams.logit_bias={params.logit_bias!r} is invalid: token ids "
                f"{bad[:5]} lie outside the vocabulary [0, {vocab})"
            )
        self._limits.check(ids, params.n)
        return ids

    def generate_many(
        self,
        requests: Sequence[tuple[Prompt | Messages, SamplingParams]],
        request_ids: Sequence[str | None] | None = None,
    ) -> "ReplicaGroup":
        """As AsyncLLM.generate_many: every request checked, then all sent (each routed on its
        own); their outputs as one async stream of (index, RequestOutput)."""
        checked = [(self.check(prompt, params), params) for prompt, params in requests]
        ids = list(request_ids) if request_ids is not None else [None] * len(checked)
        ids = [i or f"rep-{uuid.uuid4().hex}" for i in ids]
        return ReplicaGroup(self, checked, ids)

    def waiting(self) -> int:
        """Sequences waiting for a batch slot on any replica (sent here beyond each replica's
        batch, or queued there as of its last health check)."""
        with self._lock:
            return sum(
                max(r.metrics.waiting, r.in_flight - self.max_batch_size) for r in self._replicas
            )

    def metrics(self) -> EngineMetrics:
        """The replicas' metrics summed, as of their last health check."""
        with self._lock:
            return _sum_metrics(
                [r.metrics for r in self._replicas] + [r.retired for r in self._replicas]
            )

    def max_new_tokens(self, prompt_len: int, n: int = 1) -> int:
        """See LLM.max_new_tokens (one replica's KV cache)."""
        return self._limits.max_new_tokens(prompt_len, n)

    # -- LoRA adapters (an artifact with slots) -------------------------------------------------

    def loras(self) -> dict[str, LoadedLora]:
        """The adapters loaded, by name, in load order (replica 0's slots)."""
        with self._lock:
            return dict(self._loras)

    def load_lora(self, name: str, path: str | os.PathLike) -> LoadedLora:
        """As LLM.load_lora, on every replica up (one down gets it when it is back). If one
        refuses, those that took it unload it again and its RelaxlmError is raised."""
        path = str(Path(path).resolve())  # the replicas' working folder is not this one
        with self._lora_lock:
            if name in self.loras():
                raise RelaxlmError(
                    f"a LoRA adapter named {name!r} is loaded already (from "
                    f"{self._loras[name].path}); unload it first, or pick another name"
                )
            done, error = self._on_replicas("load_lora", name, path)
            if error is not None:
                self._on_replicas("unload_lora", name, only=done)
                raise error
            if not done:
                raise Unavailable("no replica is up to load the adapter; retry in a moment")
            with self._lock:
                self._loras[name] = done[min(done)]
            return self._loras[name]

    def unload_lora(self, name: str) -> LoadedLora:
        """As LLM.unload_lora, on every replica up. If one refuses (a request there still uses
        the adapter), those that unloaded it load it again and its RelaxlmError is raised."""
        with self._lora_lock:
            with self._lock:
                loaded = self._loras.get(name)
            if loaded is None:
                have = ", ".join(self._loras) or "none"
                raise RelaxlmError(
                    f"LoRA adapter {name!r} is not loaded (loaded: {have}); load it first "
                    "(POST /v1/load_lora_adapter)"
                )
            done, error = self._on_replicas("unload_lora", name)
            if error is not None:
                self._on_replicas("load_lora", name, str(loaded.path), only=done)
                raise error
            with self._lock:
                del self._loras[name]
            return loaded

    def _on_replicas(self, method: str, *args, only: dict | None = None):
        """Call a LoRA method on the replicas up (or those in `only`): ({replica: result} of
        those that did it, the first refusal or None). A replica that died meanwhile is
        skipped: it reloads the adapters when it is back (`_answered`)."""
        with self._lock:
            up = [i for i, r in enumerate(self._replicas) if r.up and (only is None or i in only)]
        calls = {i: getattr(self._replicas[i].actor, method).remote(*args) for i in up}
        done, error = {}, None
        for i, ref in calls.items():
            try:
                done[i] = self._ray.get(ref, timeout=LORA_TIMEOUT_S)
            except self._ray.exceptions.RayTaskError as e:
                error = error or _cause(e)
            except self._ray.exceptions.RayActorError:
                self._failed(i)
            except self._ray.exceptions.GetTimeoutError:
                error = error or Unavailable(
                    f"replica {i} did not {method.replace('_', ' ')} in {LORA_TIMEOUT_S:g} s; "
                    "retry in a moment"
                )
        return done, error

    # -- the replicas ---------------------------------------------------------------------------

    def replica_metrics(self) -> list[EngineMetrics]:
        """Each replica's metrics (its current incarnation), as of its last health check."""
        with self._lock:
            return [r.metrics.copy() for r in self._replicas]

    def replica_pids(self) -> list[int | None]:
        """Each replica's process id (on its node), None while it is down."""
        with self._lock:
            return [r.pid if r.up else None for r in self._replicas]

    def num_up(self) -> int:
        with self._lock:
            return sum(r.up for r in self._replicas)

    def shutdown(self) -> None:
        """Stop the health checks and the replicas (the Ray cluster stays)."""
        self._stop.set()
        for r in self._replicas:
            self._ray.kill(r.actor, no_restart=True)

    def _route(self, ids: list[int], n: int, exclude: set[int], lora: str | None = None) -> int:
        with self._lock:
            loads = {
                i: r.in_flight for i, r in enumerate(self._replicas) if r.up and i not in exclude
            }
            if not loads:
                down = sum(not r.up for r in self._replicas)
                raise Unavailable(
                    f"no replica can take the request now ({down} of {len(self._replicas)} "
                    "down and restarting); retry in a moment"
                )
            replica = self.router.choose(ids, loads, lora)
            self.router.record(ids, replica, lora)
            self._replicas[replica].in_flight += n
            return replica

    def _done(self, replica: int, n: int) -> None:
        with self._lock:
            self._replicas[replica].in_flight -= n

    def _failed(self, replica: int) -> None:
        """A call to `replica` found it dead: route around it until its health check answers."""
        with self._lock:
            self._replicas[replica].up = False

    def _watch(self) -> None:
        """The health checks, on a thread of their own (no event loop needed)."""
        while not self._stop.wait(self._interval):
            try:
                self._check_all()
            except Exception:  # keep checking: a lapse must not leave dead replicas routed to
                logger.exception("the replicas' health check failed")

    def _check_all(self) -> None:
        """One round: probe each replica (one probe in flight each), act on the answers."""
        ray = self._ray
        now = time.monotonic()
        for r in self._replicas:
            if r.probe is None:
                r.probe, r.probe_sent = r.actor.health.remote(), now
        probes = [r.probe for r in self._replicas]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=self._interval)
        ready = set(ready)
        for index, r in enumerate(self._replicas):
            if r.probe in ready:
                self._answered(index, r)
            elif r.up and time.monotonic() - r.probe_sent > self._timeout:
                # Up but silent: hung. Killing it fails its requests now; Ray restarts it.
                self._failed(index)
                ray.kill(r.actor, no_restart=False)

    def _answered(self, index: int, r: _State) -> None:
        probe, r.probe = r.probe, None
        try:
            who, metrics = self._ray.get(probe)
        except Exception:  # dead (Ray restarts it) or unreachable: the next probe waits for it
            self._failed(index)
            return
        if who["incarnation"] != r.incarnation and not self._reload_loras(index, r):
            return  # down until a probe finds it with the adapters
        with self._lock:
            if who["incarnation"] != r.incarnation:  # restarted: empty caches, counters from 0
                r.retired = _sum_metrics([r.retired, r.metrics], counters_only=True)
                r.restarts += 1
                self.router.forget(index)
            r.incarnation, r.pid, r.metrics, r.up = who["incarnation"], who["pid"], metrics, True

    def _reload_loras(self, index: int, r: _State) -> bool:
        """A restarted replica loads the adapters the others hold before it takes requests;
        whether it has them (False: it is left down, and the next probe tries again)."""
        with self._lora_lock:
            adapters = {name: str(a.path) for name, a in self.loras().items()}
            if not adapters:
                return True
            try:
                self._ray.get(r.actor.sync_loras.remote(adapters), timeout=LORA_TIMEOUT_S)
                return True
            except Exception:
                logger.exception("replica %d could not reload its LoRA adapters", index)
                self._failed(index)
                return False


class ReplicaGroup:
    """Requests sent to the replicas together (`ReplicaSet.generate_many`), as AsyncLLM's
    RequestGroup: their outputs as one async stream of (index, RequestOutput); leaving `async
    with` early aborts the unfinished ones on their replicas."""

    def __init__(
        self,
        replicas: ReplicaSet,
        requests: list[tuple[list[int], SamplingParams]],
        request_ids: list[str],
    ):
        self.prompt_ids = [ids for ids, _ in requests]
        self._replicas = replicas
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending = set(range(len(requests)))
        self._tasks = [
            asyncio.ensure_future(self._run(index, ids, params, request_id))
            for index, ((ids, params), request_id) in enumerate(
                zip(requests, request_ids, strict=True)
            )
        ]

    async def _run(self, index: int, ids: list[int], params: SamplingParams, request_id: str):
        try:
            await self._send(index, ids, params, request_id)
        except Exception as e:  # the consumer sees it as the group's error
            self._queue.put_nowait((index, e))

    async def _send(self, index: int, ids: list[int], params: SamplingParams, request_id: str):
        ray, replicas = self._replicas._ray, self._replicas
        tried: set[int] = set()
        while True:
            replica = replicas._route(ids, params.n, tried, params.lora)
            actor = replicas._replicas[replica].actor
            streamed = finished = False
            outputs = None
            try:
                outputs = actor.generate.remote(ids, params, request_id)
                async for ref in outputs:
                    output = await ref
                    streamed, finished = True, output.finished
                    self._queue.put_nowait((index, output))
                return
            except ray.exceptions.RayTaskError as e:  # the engine refused or failed it
                finished = True
                raise _cause(e) from None
            except ray.exceptions.RayActorError as e:  # died (or unreachable) while serving it
                finished = True
                replicas._failed(replica)
                if streamed:
                    raise Unavailable(
                        f"replica {replica} failed while answering this request: {_cause(e)}; "
                        "retry it"
                    ) from None
                tried.add(replica)
                replicas.retries += 1
            finally:
                replicas._done(replica, params.n)
                if not finished and outputs is not None:  # cancelled: the client left
                    actor.abort.remote(request_id)
                    ray.cancel(outputs)

    async def __aenter__(self) -> "ReplicaGroup":
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()

    def __aiter__(self) -> "ReplicaGroup":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._pending:
            raise StopAsyncIteration
        index, output = await self._queue.get()
        if isinstance(output, BaseException):
            self.abort()
            raise output
        if output.finished:
            self._pending.discard(index)
        return index, output

    def abort(self) -> None:
        """Cancel the requests still running; never waits."""
        for task in self._tasks:
            task.cancel()
        self._pending.clear()


def _import_ray(local: bool):
    if local and "ray" not in sys.modules:
        # A cluster started here for one server stays on loopback: Ray reads this (its macOS
        # default) when imported, and binds its servers to 127.0.0.1. Join a cluster started
        # with `ray start` (--ray-address) to spread replicas over machines.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as e:
        raise RelaxlmError(
            "replicas run on Ray, which is not installed; pip install 'relaxlm[ray]'"
        ) from e
    return ray


def _cause(e: Exception) -> BaseException:
    """The exception a Ray task raised, without Ray's wrapping."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _sum_metrics(parts: list[EngineMetrics], counters_only: bool = False) -> EngineMetrics:
    """Counters and histograms summed; gauges too, unless `counters_only` (a dead replica's)."""
    out = EngineMetrics()
    gauges = {
        "waiting",
        "running",
        "kv_pages_total",
        "kv_pages_free",
        "kv_pages_cached",
        "kv_cache_tokens",
        "kv_cache_bytes",
    }
    for field in dataclasses.fields(EngineMetrics):
        values = [getattr(m, field.name) for m in parts]
        if field.name == "page_size":
            out.page_size = max(values)
        elif isinstance(values[0], Histogram):
            setattr(out, field.name, _sum_histograms(values))
        elif not (counters_only and field.name in gauges):
            setattr(out, field.name, sum(values))
    return out


def _sum_histograms(parts: list[Histogram]) -> Histogram:
    out = Histogram(parts[0].bounds)
    for h in parts:
        out.counts = [a + b for a, b in zip(out.counts, h.counts, strict=True)]
        out.sum += h.sum
        out.count += h.count
    return out

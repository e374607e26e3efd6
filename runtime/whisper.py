"""Whisper transcription over a compiled artifact: log-mel windows -> `encode_audio` ->
`cross_kv` (once per window) -> the decoder's `prefill` / `decode` on the paged KV cache.

Audio longer than one window is transcribed the reference's way: window after window, each
starting where the last completed segment ended (timestamps are then always predicted).
Imports only the TVM runtime, numpy and relaxlm's runtime modules - never compiler code.
"""

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from relaxlm.errors import RelaxlmError

from .audio import LogMel
from .loader import load_artifact
from .model import _kv
from .tokenizer import Tokenizer
from .whisper_decode import (
    COMPRESSION_RATIO_THRESHOLD,
    FALLBACK_TEMPERATURES,
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    Fallback,
    LogitRules,
    Segment,
    SpecialTokens,
    compression_ratio,
    split_segments,
)

INPUT_STRIDE = 2  # feature frames per encoder position (conv2's stride)


@dataclass
class WindowResult:
    """One decoded window: generated tokens (no prompt, no end-of-text) and the figures the
    reference reports for it."""

    tokens: list[int]
    avg_logprob: float  # mean logprob of the tokens and the end-of-text
    temperature: float
    no_speech_prob: float  # P(<|nospeech|>) at the step after <|startoftranscript|>
    compression_ratio: float = 0.0


@dataclass
class Transcription:
    """The transcript of one audio input."""

    text: str
    language: str | None
    duration: float  # seconds of audio
    segments: list[Segment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # every window's tokens, in order


class WhisperModel:
    """A compiled Whisper artifact on one device, transcribing one input at a time."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        loaded = load_artifact(folder, device, "transcribe", threads)
        self.folder, self.manifest, self.device = loaded.folder, loaded.manifest, loaded.device
        self.vm, self.params = loaded.vm, loaded.params
        self.speech = self.manifest.speech
        self.tokens = SpecialTokens.from_manifest(self.speech["generation"])
        self.features = LogMel(self.speech)
        self.sampling_rate = self.speech["sampling_rate"]
        self.max_length = self.speech["max_target_positions"]
        self.tokenizer = Tokenizer.from_dir(
            self.folder / "tokenizer", model_config=self.manifest.model_config
        )
        self.kv_cache = self.vm["create_paged_kv_cache"](
            ShapeTuple([1]),
            ShapeTuple([self.max_length]),
            ShapeTuple([self.manifest.prefill_chunk_size]),
            ShapeTuple([self.manifest.kv_cache["page_size"]]),
            ShapeTuple([0]),
        )

    # -- entry functions ----------------------------------------------------------------------

    def encode(self, features: np.ndarray) -> np.ndarray:
        """[b, n_mels, frames] log-mel windows -> encoder states [b, T, d_model]."""
        x = tvm.runtime.tensor(np.ascontiguousarray(features, dtype=np.float32), self.device)
        return self.vm["encode_audio"](x, self.params).numpy()

    def cross_kv(self, states: np.ndarray) -> tvm.runtime.Tensor:
        """Encoder states -> every decoder layer's cross-attention keys and values (on device)."""
        x = tvm.runtime.tensor(np.ascontiguousarray(states, dtype=np.float32), self.device)
        return self.vm["cross_kv"](x, self.params)

    def decoder_logits(self, cross_kv, prompt: list[int], steps: list[int] = ()) -> np.ndarray:
        """Logits after every token of `prompt` (one prefill) and then of each of `steps` (one
        decode each) for one sequence: [len(prompt) + len(steps), vocab]."""
        rows = [self._forward(cross_kv, prompt, first=True)]
        rows += [self._forward(cross_kv, [token]) for token in steps]
        _kv["kv_state_remove_sequence"](self.kv_cache, 0)
        return np.concatenate(rows)

    def _forward(self, cross_kv, ids: list[int], first: bool = False) -> np.ndarray:
        if first:
            _kv["kv_state_add_sequence"](self.kv_cache, 0)
        x = tvm.runtime.tensor(np.array(ids, dtype="int32").reshape(1, -1), self.device)
        _kv["kv_state_begin_forward"](self.kv_cache, ShapeTuple([0]), ShapeTuple([len(ids)]))
        if first:
            out = self.vm["prefill"](x, cross_kv, self.kv_cache, self.params)
        else:
            x = tvm.runtime.tensor(np.array(ids, dtype="int32").reshape(-1, 1), self.device)
            out = self.vm["decode"](x, cross_kv, self.kv_cache, self.params)
        _kv["kv_state_end_forward"](self.kv_cache)
        return out.numpy()[0]  # [tokens, vocab]

    # -- decoding -----------------------------------------------------------------------------

    def generate(
        self,
        cross_kv,
        prompt: list[int],
        rules: LogitRules,
        temperature: float = 0.0,
        rng: np.random.Generator | None = None,
        max_new_tokens: int | None = None,
    ) -> WindowResult:
        """Greedy (temperature 0) or sampled tokens after `prompt` until end-of-text."""
        limit = self.max_length - len(prompt)
        if max_new_tokens is not None:
            limit = min(limit, max_new_tokens)
        ids, logprob_sum = list(prompt), 0.0
        prefill = self._forward(cross_kv, prompt, first=True)
        # openai/whisper: the no-speech token's probability, unmasked, where the decoder
        # predicts what follows <|startoftranscript|> (its last occurrence: after any context)
        sot = len(prompt) - 1 - prompt[::-1].index(self.tokens.start)
        no_speech = float(np.exp(_log_softmax(prefill[sot])[self.tokens.no_speech]))
        logits = prefill[-1]
        try:
            for _ in range(limit):
                scores = rules(ids, logits)
                token = _choose(scores, temperature, rng)
                logprob_sum += float(_log_softmax(scores)[token])
                ids.append(token)
                if token == self.tokens.eos or len(ids) >= self.max_length:
                    break
                logits = self._forward(cross_kv, [token])[-1]
        finally:
            _kv["kv_state_remove_sequence"](self.kv_cache, 0)
        generated = ids[len(prompt) :]
        avg = logprob_sum / max(1, len(generated))
        if generated and generated[-1] == self.tokens.eos:
            generated = generated[:-1]
        return WindowResult(generated, avg, temperature, no_speech)

    def detect_language(self, cross_kv) -> str:
        """The language whose token the decoder rates highest after <|startoftranscript|>."""
        if not self.tokens.multilingual:
            return "en"
        logits = self.decoder_logits(cross_kv, [self.tokens.start])[0]
        names = list(self.tokens.languages)
        ids = np.array([self.tokens.languages[n] for n in names])
        return names[int(np.argmax(logits[ids]))]

    def transcribe(self, audio: np.ndarray, **options: Any) -> Transcription:
        """Transcribe (or translate to English) mono samples at the model's rate; the options
        are `segments()`'s."""
        run = self.segments(audio, **options)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def segments(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        task: str = "transcribe",
        timestamps: bool = False,
        temperature: float | tuple[float, ...] = 0.0,
        fallback: bool = True,
        logprob_threshold: float | None = LOGPROB_THRESHOLD,
        compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
        no_speech_threshold: float | None = NO_SPEECH_THRESHOLD,
        prompt: str | None = None,
        seed: int = 0,
    ) -> Generator[Segment, None, Transcription]:
        """Yield the transcript's segments as each window is decoded; return the whole
        Transcription.

        temperature: a number, or the schedule to try in turn; with `fallback` a number t starts
            the reference's schedule at t (0, 0.2, ... 1.0). A window moves on to the next
            temperature when its text compresses better than `compression_ratio_threshold`
            (loops) or its mean logprob is under `logprob_threshold` (None: not checked).
        no_speech_threshold: a window whose P(<|nospeech|>) is over it, with its mean logprob
            not over `logprob_threshold`, is silence: no fallback, no text (openai/whisper's).
        timestamps: predict timestamps (always on for audio longer than one window).
        prompt: text that precedes the audio (spelling, names, style), as <|startofprev|>
            context of the first window (transformers' default "first-segment").
        """
        t = self.tokens
        if language is not None and t.multilingual:
            t.language_token(language)  # an unknown language fails before any decoding
        elif language is not None and language.lower() != "en":
            raise RelaxlmError(
                f"language {language!r}: this model is English-only; leave language unset or "
                "use 'en'"
            )
        frames = self.features.spectrogram(audio)  # [n_mels, total frames]
        total = audio.size // self.speech["hop_length"]
        frames = frames[:, :total]
        window = self.features.n_frames
        long_form = total > window
        timestamps = timestamps or long_form
        schedule = _schedule(temperature, fallback)
        when = Fallback(logprob_threshold, compression_ratio_threshold, no_speech_threshold)
        rng = np.random.default_rng(seed)
        context = self._context(prompt)
        segments, all_tokens, seek, lang = [], [], 0, None
        while seek < total:
            count = min(window, total - seek)
            if long_form:
                chunk = np.zeros((frames.shape[0], window), dtype=np.float32)
                chunk[:, :count] = frames[:, seek : seek + count]  # zeros, as the reference pads
            else:
                chunk = self.features(audio)
            kv = self.cross_kv(self.encode(chunk[None]))
            if lang is None:
                lang = language or self.detect_language(kv)
            ids = context + self.decoder_prompt(lang, task, timestamps)
            context = []
            rules = LogitRules(t, timestamps, begin_index=len(ids))
            result = self._with_fallback(kv, ids, rules, schedule, when, rng)
            if when.silent(result.avg_logprob, result.no_speech_prob):
                seek += count
                continue
            all_tokens += result.tokens
            offset = seek * self.speech["hop_length"] / self.sampling_rate
            if timestamps:
                found, advance = split_segments(
                    result.tokens, t.timestamp_begin, offset, count, INPUT_STRIDE
                )
            else:
                found, advance = [Segment(offset, offset + count * 0.01, result.tokens)], count
            for segment in found:
                segment.seek, segment.temperature = seek, result.temperature
                segment.avg_logprob, segment.no_speech_prob = (
                    result.avg_logprob,
                    result.no_speech_prob,
                )
                segment.compression_ratio = result.compression_ratio
                segments.append(segment)
                yield segment
            seek += max(advance, 1)
        text = "".join(self.text(s.tokens) for s in segments)
        return Transcription(text, lang, audio.size / self.sampling_rate, segments, all_tokens)

    def _with_fallback(self, kv, prompt, rules, schedule, when: Fallback, rng) -> WindowResult:
        for i, temperature in enumerate(schedule):
            result = self.generate(kv, prompt, rules, temperature, rng)
            result.compression_ratio = compression_ratio(self.text(result.tokens))
            last = i == len(schedule) - 1
            figures = result.compression_ratio, result.avg_logprob, result.no_speech_prob
            if last or not when.needed(*figures):
                return result
        raise AssertionError("unreachable: the schedule is never empty")

    def decoder_prompt(
        self, language: str, task: str, timestamps: bool, prompt: str | None = None
    ) -> list[int]:
        """The decoder's input before the first generated token: <|startofprev|> and the
        prompt's tokens (when given), then <|startoftranscript|>, language, task, and
        <|notimestamps|> unless timestamps are predicted."""
        t = self.tokens
        language_token = t.language_token(language) if t.multilingual else None
        return self._context(prompt) + t.prompt(language_token, task, timestamps)

    def _context(self, prompt: str | None) -> list[int]:
        if not prompt:
            return []
        if self.tokens.prev is None:
            raise RelaxlmError("this model's generation_config.json has no prev_sot_token_id")
        ids = self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
        return [self.tokens.prev, *ids[-(self.max_length // 2 - 1) :]]

    def text(self, tokens: list[int]) -> str:
        """Text of tokens, timestamps and other special tokens dropped."""
        return self.tokenizer.decode([i for i in tokens if i < self.tokens.eos])


def _schedule(temperature: float | tuple[float, ...], fallback: bool) -> tuple[float, ...]:
    if isinstance(temperature, tuple | list):
        return tuple(float(x) for x in temperature)
    if not 0.0 <= float(temperature) <= 2.0:
        raise RelaxlmError(f"temperature={temperature!r} is invalid; use a number in [0, 2]")
    if not fallback:
        return (float(temperature),)
    return tuple(x for x in FALLBACK_TEMPERATURES if x >= temperature) or (float(temperature),)


def _choose(scores: np.ndarray, temperature: float, rng) -> int:
    if temperature <= 0.0:
        return int(np.argmax(scores))
    probs = np.exp(_log_softmax(scores / temperature))
    return int(rng.choice(scores.size, p=probs / probs.sum()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max()
    return x - top - np.log(np.exp(x - top).sum())

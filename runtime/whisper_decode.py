"""Whisper's decoding rules as plain functions over numpy arrays: the decoder prompt, the logit
rules (suppressed tokens, timestamp grammar), segments cut at timestamp pairs, and the checks
that send a window to a higher temperature.

Data in, data out: no model here, so each rule is tested alone. The rules follow the reference
decoder (openai/whisper's `decoding.py`, as transformers' Whisper generation applies them).
"""

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from relaxlm.errors import RelaxlmError

TIME_PRECISION = 0.02  # seconds per timestamp token
# The reference's fallback schedule and thresholds (openai/whisper `transcribe`).
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6


@dataclass(frozen=True)
class SpecialTokens:
    """The ids generation_config.json gives Whisper's control tokens."""

    start: int  # <|startoftranscript|>
    eos: int  # <|endoftext|>
    no_timestamps: int
    prev: int | None  # <|startofprev|>, before a prompt
    languages: dict[str, int]  # "en" -> <|en|>
    tasks: dict[str, int]  # "transcribe", "translate"
    multilingual: bool
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    max_initial_timestamp_index: int | None

    @property
    def no_speech(self) -> int:
        """<|nospeech|> (<|nocaptions|> in older vocabularies): just before <|notimestamps|>."""
        return self.no_timestamps - 1

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @classmethod
    def from_manifest(cls, generation: dict[str, Any]) -> "SpecialTokens":
        eos = generation.get("eos_token_id", 50257)
        if isinstance(eos, list):
            eos = eos[0]
        if "no_timestamps_token_id" not in generation:
            raise RelaxlmError(
                "the checkpoint's generation_config.json lacks no_timestamps_token_id; Whisper "
                "decoding needs it (save the model's GenerationConfig with the checkpoint)"
            )
        languages = {
            name.strip("<|>"): int(token)
            for name, token in (generation.get("lang_to_id") or {}).items()
        }
        return cls(
            start=int(generation["decoder_start_token_id"]),
            eos=int(eos),
            no_timestamps=int(generation["no_timestamps_token_id"]),
            prev=generation.get("prev_sot_token_id"),
            languages=languages,
            tasks={k: int(v) for k, v in (generation.get("task_to_id") or {}).items()},
            multilingual=bool(generation.get("is_multilingual", bool(languages))),
            suppress=tuple(generation.get("suppress_tokens") or ()),
            begin_suppress=tuple(generation.get("begin_suppress_tokens") or ()),
            max_initial_timestamp_index=generation.get("max_initial_timestamp_index"),
        )

    def language_token(self, language: str) -> int:
        token = self.languages.get(language.lower())
        if token is None:
            raise RelaxlmError(
                f"language {language!r} is not one the model knows; use one of "
                f"{', '.join(sorted(self.languages)) or '(none: an English-only model)'}"
            )
        return token

    def prompt(self, language: int | None, task: str, timestamps: bool) -> list[int]:
        """The decoder prompt: start, language and task (multilingual models), and
        <|notimestamps|> unless timestamps are predicted."""
        ids = [self.start]
        if self.multilingual:
            if task not in self.tasks:
                raise RelaxlmError(f"task {task!r} is not one of {', '.join(self.tasks)}")
            ids += [language, self.tasks[task]]
        elif task != "transcribe":
            raise RelaxlmError("this model is English-only: it transcribes and cannot translate")
        if not timestamps:
            ids.append(self.no_timestamps)
        return ids


@dataclass
class LogitRules:
    """Masks applied to every step's logits, in the reference's order: tokens suppressed at the
    first step, always-suppressed tokens, then (with timestamps) the timestamp grammar."""

    tokens: SpecialTokens
    timestamps: bool
    begin_index: int  # length of the decoder prompt
    _suppress: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self._suppress = np.array(self.tokens.suppress, dtype=np.int64)

    def __call__(self, ids: list[int], logits: np.ndarray) -> np.ndarray:
        """ids: the sequence so far, prompt included; logits: [vocab] float32 (a copy returns)."""
        scores = logits.astype(np.float32, copy=True)
        t = self.tokens
        if len(ids) == self.begin_index and t.begin_suppress:
            scores[list(t.begin_suppress)] = -np.inf
        if self._suppress.size:
            scores[self._suppress[self._suppress < scores.size]] = -np.inf
        if self.timestamps:
            self._timestamp_rules(ids, scores)
        return scores

    def _timestamp_rules(self, ids: list[int], scores: np.ndarray) -> None:
        t, begin = self.tokens, self.tokens.timestamp_begin
        scores[t.no_timestamps] = -np.inf
        seq = ids[self.begin_index :]
        last = len(seq) >= 1 and seq[-1] >= begin
        penultimate = len(seq) < 2 or seq[-2] >= begin
        if last:  # timestamps come in pairs around text
            if penultimate:
                scores[begin:] = -np.inf
            else:
                scores[: t.eos] = -np.inf
        stamps = [token for token in seq if token >= begin]
        if stamps:  # never backwards; a closed pair's end may not repeat
            floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
            scores[begin:floor] = -np.inf
        if len(ids) == self.begin_index:  # the first token is a timestamp, early enough
            scores[:begin] = -np.inf
            if t.max_initial_timestamp_index is not None:
                scores[begin + t.max_initial_timestamp_index + 1 :] = -np.inf
        logprobs = _log_softmax(scores)
        stamp_mass = _logsumexp(logprobs[begin:])
        if stamp_mass > logprobs[:begin].max():  # timestamps together outweigh any text token
            scores[:begin] = -np.inf


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max()
    shifted = x.astype(np.float64) - top
    return shifted - math.log(np.exp(shifted).sum())


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    if not np.isfinite(top):
        return float(top)
    return float(top + math.log(np.exp(x - top).sum()))


@dataclass
class Segment:
    """A stretch of transcript with its time span (seconds from the start of the audio)."""

    start: float
    end: float
    tokens: list[int]  # text tokens, timestamps included where predicted
    # The window's figures, shared by its segments as in the reference's verbose output.
    seek: int = 0  # feature frame where the window starts
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


def split_segments(
    tokens: list[int], timestamp_begin: int, offset_s: float, window_frames: int, stride: int
) -> tuple[list[Segment], int]:
    """Cut one window's generated tokens (prompt and end-of-text removed) at consecutive
    timestamp pairs, as the reference does; returns the segments and how many feature frames
    the next window moves on (the whole window, or to the last completed segment's end)."""
    is_stamp = [token >= timestamp_begin for token in tokens]
    single_ending = is_stamp[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]
    if not cuts:
        end_pos = window_frames * 0.01 / TIME_PRECISION  # 10 ms feature frames
        stamps = [token for token in tokens if token >= timestamp_begin]
        if stamps and stamps[-1] != timestamp_begin:
            end_pos = stamps[-1] - timestamp_begin
        segment = Segment(offset_s, offset_s + end_pos * TIME_PRECISION, list(tokens))
        return [segment], window_frames
    if single_ending:
        cuts.append(len(tokens))
    else:
        cuts[-1] += 1
    segments, start = [], 0
    for i, cut in enumerate(cuts):
        piece = tokens[start:cut]
        last_piece = i == len(cuts) - 1
        end_token = piece[-1] if not last_piece or single_ending else piece[-2]
        segments.append(
            Segment(
                offset_s + (piece[0] - timestamp_begin) * TIME_PRECISION,
                offset_s + (end_token - timestamp_begin) * TIME_PRECISION,
                list(piece),
            )
        )
        start = cut
    if single_ending:
        return segments, window_frames
    return segments, (tokens[start - 2] - timestamp_begin) * stride


def compression_ratio(text: str) -> float:
    """How well the text compresses (openai/whisper's zlib ratio of its UTF-8 bytes):
    repetitive (looping) output compresses far better."""
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


@dataclass(frozen=True)
class Fallback:
    """When a window is decoded again at the schedule's next temperature, or dropped as
    silence (None: never on that ground). The defaults are openai/whisper's."""

    logprob_threshold: float | None = LOGPROB_THRESHOLD
    compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD

    def needed(self, compression: float, avg_logprob: float, no_speech_prob: float) -> bool:
        """Whether a window's result looks degenerate: it loops (compresses too well) or the
        model was unsure of it (low mean logprob) - unless the window is silence."""
        too_repetitive = (
            self.compression_ratio_threshold is not None
            and compression > self.compression_ratio_threshold
        )
        too_unsure = self.logprob_threshold is not None and avg_logprob < self.logprob_threshold
        return (too_repetitive or too_unsure) and not self.silent(avg_logprob, no_speech_prob)

    def silent(self, avg_logprob: float, no_speech_prob: float) -> bool:
        """Whether the window holds no speech: <|nospeech|> likely and the text unsure."""
        if self.no_speech_threshold is None or no_speech_prob <= self.no_speech_threshold:
            return False
        return self.logprob_threshold is None or avg_logprob <= self.logprob_threshold

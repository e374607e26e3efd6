"""Speech recognition in the SDK: `relaxlm.LLM(whisper)` returns a `SpeechLLM`, whose
`transcribe()` takes a file, encoded bytes or samples and returns the transcript."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.audio import load_audio
from relaxlm.runtime.whisper import Transcription, WhisperModel
from relaxlm.runtime.whisper_decode import (
    COMPRESSION_RATIO_THRESHOLD,
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    Segment,
)


class SpeechLLM:
    """A speech recognizer (manifest task "transcribe"): `transcribe()` only, one request at
    a time (the server runs them one after another)."""

    def __init__(self, folder: Path, device: str = "cpu", threads: int | None = None):
        self.artifact = folder
        self.model = WhisperModel(folder, device=device, threads=threads)
        self.manifest = self.model.manifest
        self.tokenizer = self.model.tokenizer

    @property
    def sampling_rate(self) -> int:
        return self.model.sampling_rate

    def transcribe(
        self,
        audio: str | Path | bytes | np.ndarray,
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
        stream: bool = False,
    ) -> Transcription | Iterator[str]:
        """The transcript of `audio` (a path, encoded bytes, or mono float samples at
        `sampling_rate`); task "translate" gives English text. Audio over 30 s is decoded
        window by window with timestamps. language: None detects it. temperature: a number or a
        schedule tried in turn while a window's mean logprob is under `logprob_threshold` or its
        text compresses better than `compression_ratio_threshold`; a window likelier silent than
        `no_speech_threshold` whose logprob is that low gives no text. stream: yield the text in
        pieces as windows are decoded instead (joined, they are the transcript's `.text`,
        stripped)."""
        samples = load_audio(audio, self.sampling_rate)
        segments = self.model.segments(
            samples,
            language=language,
            task=task,
            timestamps=timestamps,
            temperature=temperature,
            fallback=fallback,
            logprob_threshold=logprob_threshold,
            compression_ratio_threshold=compression_ratio_threshold,
            no_speech_threshold=no_speech_threshold,
            prompt=prompt,
        )
        if stream:
            return self._pieces(segments)
        while True:
            try:
                next(segments)
            except StopIteration as done:
                return done.value

    def _pieces(self, segments: Iterator[Segment]) -> Iterator[str]:
        """Each segment's text, stripped at both ends of the whole as the full text is."""
        started, held = False, ""
        for segment in segments:
            text = self.model.text(segment.tokens)
            if not started:
                text = text.lstrip()
            body = text.rstrip()
            if body:
                yield held + body
                started, held = True, text[len(body) :]
            elif started:
                held += text

    def generate(self, *args: Any, **kwargs: Any):
        """Speech models generate no text from text: a RelaxlmError that names transcribe()."""
        raise RelaxlmError(f"{self.artifact} is a speech recognizer; use transcribe(audio)")

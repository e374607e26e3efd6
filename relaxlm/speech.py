"""Speech recognition in the SDK: `relaxlm.LLM(whisper)` returns a `SpeechLLM`, whose
`transcribe()` takes a file, encoded bytes or samples and returns the transcript."""

from pathlib import Path
from typing import Any

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.audio import load_audio
from relaxlm.runtime.whisper import Transcription, WhisperModel


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
        temperature: float = 0.0,
        fallback: bool = True,
        prompt: str | None = None,
    ) -> Transcription:
        """The transcript of `audio` (a path, encoded bytes, or mono float samples at
        `sampling_rate`); task "translate" gives English text. Audio over 30 s is decoded
        window by window with timestamps. language: None detects it."""
        samples = load_audio(audio, self.sampling_rate)
        return self.model.transcribe(
            samples,
            language=language,
            task=task,
            timestamps=timestamps,
            temperature=temperature,
            fallback=fallback,
            prompt=prompt,
        )

    def generate(self, *args: Any, **kwargs: Any):
        """Speech models generate no text from text: a RelaxlmError that names transcribe()."""
        raise RelaxlmError(f"{self.artifact} is a speech recognizer; use transcribe(audio)")

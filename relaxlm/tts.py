"""Text-to-speech in the SDK: `relaxlm.LLM(vits)` returns a `SpeechSynthesizer`, whose
`speak()` returns the samples, and `audio_bytes()` encodes them as OpenAI's formats."""

import io
from pathlib import Path

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.vits import Speech, VitsModel

# OpenAI's voices. A one-speaker checkpoint (MMS-TTS) speaks every one with its voice; a
# multi-speaker one maps the i-th name to speaker i mod num_speakers, and also takes "0", "1", ...
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer")
# response_format -> (soundfile format, subtype); "pcm" is raw 16-bit little-endian samples.
FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
    "pcm": (None, None),
}
MEDIA_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "pcm": "audio/pcm",
}


class SpeechSynthesizer:
    """A text-to-speech model (manifest task "synthesize"): `speak()` only, one text at a time."""

    def __init__(self, folder: Path, device: str = "cpu", threads: int | None = None):
        self.artifact = folder
        self.model = VitsModel(folder, device=device, threads=threads)
        self.manifest = self.model.manifest

    @property
    def sampling_rate(self) -> int:
        return self.model.sampling_rate

    def speak(
        self, text: str, *, voice: str | None = None, speed: float = 1.0, seed: int = 0
    ) -> Speech:
        """Speech for `text`: mono float32 samples at `sampling_rate`. voice: one of VOICES, or a
        speaker number of a multi-speaker model (see VOICES); speed: 0.25 .. 4.0; seed: the
        noise draws."""
        speaker = self.speaker(voice)
        if not isinstance(text, str) or not text.strip():
            raise RelaxlmError("the text to speak is empty")
        return self.model.synthesize(text, speed=float(speed), seed=seed, speaker=speaker)

    def speaker(self, voice: str | None) -> int:
        """The speaker number a voice name (or a number, "0" .. "n-1") selects."""
        count = self.model.num_speakers
        if voice is None or voice in VOICES:
            return VOICES.index(voice) % count if voice else 0
        if voice.isdigit() and int(voice) < count:
            return int(voice)
        numbers = f", or a speaker number 0 .. {count - 1}" if count > 1 else ""
        raise RelaxlmError(
            f"voice {voice!r} is not one of {', '.join(VOICES)}{numbers} (this model has "
            f"{count} speaker{'s' if count > 1 else ''})"
        )

    def generate(self, *args, **kwargs):
        """Speech synthesizers generate no text: a RelaxlmError that names speak()."""
        raise RelaxlmError(f"{self.artifact} is a speech synthesizer; use speak(text)")

    def transcribe(self, *args, **kwargs):
        """Speech synthesizers transcribe nothing: a RelaxlmError that names the model needed."""
        raise RelaxlmError(
            f"{self.artifact} is a speech synthesizer; transcription needs a speech recognizer "
            "(WhisperForConditionalGeneration)"
        )


def audio_bytes(speech: Speech, fmt: str = "wav") -> bytes:
    """`speech` encoded as `fmt` (one of FORMATS), 16-bit where the format has a bit depth."""
    if fmt not in FORMATS:
        raise RelaxlmError(f"response_format {fmt!r} is not one of {', '.join(FORMATS)}")
    samples = np.clip(speech.samples, -1.0, 1.0)
    if fmt == "pcm":
        return (samples * 32767.0).round().astype("<i2").tobytes()
    import soundfile

    container, subtype = FORMATS[fmt]
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, speech.sampling_rate, format=container, subtype=subtype)
    return buffer.getvalue()

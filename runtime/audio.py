"""Audio in: decoding files to mono float32 at the model's rate, and Whisper's log-mel features
computed as transformers' `WhisperFeatureExtractor` computes them.

Formats and what decodes them (the `audio` extra): WAV, FLAC and OGG/Vorbis through
`soundfile` (libsndfile); MP3, WebM, M4A and anything else FFmpeg reads through `av`
(PyAV). Resampling to the model's rate is a polyphase filter (`scipy.signal.resample_poly`).
Everything comes from the manifest's `speech` entry; no compiler code is imported.
"""

import io
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from relaxlm.errors import RelaxlmError

# One upload or file: larger is refused before decoding. Two hours of 16 kHz audio is the
# longest accepted (as OpenAI caps an upload's size, not its length).
MAX_AUDIO_BYTES = 25 * 1024 * 1024
MAX_AUDIO_SECONDS = 2 * 60 * 60


def load_audio(source: Any, sampling_rate: int, max_bytes: int = MAX_AUDIO_BYTES) -> np.ndarray:
    """Mono float32 samples at `sampling_rate` from a file path, encoded bytes, or an array
    (taken to be at `sampling_rate` already). RelaxlmError naming the problem otherwise."""
    if isinstance(source, np.ndarray):
        audio = np.asarray(source, dtype=np.float32)
        if audio.ndim != 1:
            raise RelaxlmError(f"audio array has shape {audio.shape}; pass mono samples, 1-D")
        return _checked(audio, sampling_rate, "the audio array")
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise RelaxlmError(f"audio file {str(source)[:200]!r} does not exist")
        if path.stat().st_size > max_bytes:
            raise RelaxlmError(f"audio file {path} is over the limit of {max_bytes} bytes")
        return decode_audio(path.read_bytes(), sampling_rate, str(path))
    if isinstance(source, bytes | bytearray | memoryview):
        return decode_audio(bytes(source), sampling_rate, "the audio bytes", max_bytes)
    raise RelaxlmError(
        "audio must be a file path, encoded bytes or a 1-D float array, not "
        f"{type(source).__name__}"
    )


def decode_audio(
    data: bytes, sampling_rate: int, what: str = "the audio", max_bytes: int = MAX_AUDIO_BYTES
) -> np.ndarray:
    """Decode an encoded file to mono float32 at `sampling_rate`."""
    if not data:
        raise RelaxlmError(f"{what} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise RelaxlmError(f"{what} is {len(data)} bytes; the limit is {max_bytes} bytes")
    decoded = _soundfile(data)
    if decoded is None:
        decoded = _pyav(data, what)
    samples, rate = decoded
    if samples.ndim == 2:  # [frames, channels] -> mono
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise RelaxlmError(f"{what} holds no audio samples")
    # checked at the file's own rate: a too-long file is refused before resampling it
    return resample(_checked(samples.astype(np.float32), rate, what), rate, sampling_rate)


def _soundfile(data: bytes) -> tuple[np.ndarray, int] | None:
    try:
        import soundfile
    except ImportError:  # pragma: no cover - the audio extra is missing
        raise RelaxlmError("audio needs soundfile: pip install 'relaxlm[audio]'") from None
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None  # not a libsndfile format: try FFmpeg
    return samples, int(rate)


def _pyav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    try:
        import av
    except ImportError:  # pragma: no cover - the audio extra is missing
        raise RelaxlmError(
            f"{what} is not WAV/FLAC/OGG; other formats (MP3, WebM, ...) need PyAV: "
            "pip install 'relaxlm[audio]'"
        ) from None
    chunks, rate = [], None
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise RelaxlmError(f"{what} has no audio stream")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                array = frame.to_ndarray()  # [channels, n] planar, or [1, n * channels] packed
                if not frame.format.is_planar:
                    array = array.reshape(-1, len(frame.layout.channels)).T
                chunks.append(_to_float(array).mean(axis=0))
                rate = frame.sample_rate
    except av.error.FFmpegError as e:
        raise RelaxlmError(
            f"{what} is not a supported audio file (WAV, FLAC, OGG, MP3, WebM, ...): {e}"
        ) from None
    if not chunks:
        raise RelaxlmError(f"{what} holds no audio samples")
    return np.concatenate(chunks), int(rate)


def _to_float(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind == "i":
        return array.astype(np.float32) / float(2 ** (8 * array.dtype.itemsize - 1))
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    raise RelaxlmError(f"audio sample format {array.dtype} is not supported")


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`samples` at `rate` Hz -> at `target` Hz (polyphase, scipy)."""
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    ratio = Fraction(target, rate)
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def _checked(audio: np.ndarray, sampling_rate: int, what: str) -> np.ndarray:
    if audio.size == 0:
        raise RelaxlmError(f"{what} holds no samples")
    if audio.size > MAX_AUDIO_SECONDS * sampling_rate:
        raise RelaxlmError(
            f"{what} is {audio.size / sampling_rate:.0f} s long; the limit is "
            f"{MAX_AUDIO_SECONDS} s (2 hours): split it into shorter files"
        )
    if not np.isfinite(audio).all():
        raise RelaxlmError(f"{what} holds NaN or infinite samples")
    return audio


# -- log-mel features ----------------------------------------------------------------------


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_step = 27.0 / math.log(6.4)
    return np.where(
        hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * log_step
    )


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log_step = math.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


def mel_filters(n_mels: int, n_fft: int, sampling_rate: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters from 0 to 8 kHz, [n_fft // 2 + 1, n_mels]."""
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2)
    edges = _mel_to_hz(mels)  # [n_mels + 2] filter corners in Hz
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # [freqs, n_mels + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]  # equal area per filter


class LogMel:
    """Whisper's log-mel spectrogram of 30 s windows, as WhisperFeatureExtractor computes it."""

    def __init__(self, speech: dict[str, Any]):
        self.n_fft, self.hop = speech["n_fft"], speech["hop_length"]
        self.sampling_rate = speech["sampling_rate"]
        self.n_samples = speech["chunk_length"] * self.sampling_rate
        self.n_frames = speech["n_frames"]
        self.padding_value = speech["padding_value"]
        self.filters = mel_filters(speech["feature_size"], self.n_fft, self.sampling_rate)
        n = np.arange(self.n_fft)
        self.window = 0.5 - 0.5 * np.cos(2 * np.pi * n / self.n_fft)  # periodic Hann

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Features of `audio` padded (or cut) to one window: [n_mels, n_frames] float32."""
        window = np.full(self.n_samples, self.padding_value, dtype=np.float64)
        window[: min(audio.size, self.n_samples)] = audio[: self.n_samples]
        return self.spectrogram(window)[:, : self.n_frames]

    def spectrogram(self, audio: np.ndarray) -> np.ndarray:
        """Features of all of `audio` (any length): [n_mels, len // hop] float32."""
        half = self.n_fft // 2
        padded = np.pad(np.asarray(audio, dtype=np.float64), half, mode="reflect")  # centred
        count = 1 + (padded.size - self.n_fft) // self.hop
        starts = np.arange(count)[:, None] * self.hop
        frames = padded[starts + np.arange(self.n_fft)[None, :]] * self.window  # [count, n_fft]
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [count, freqs]
        mel = power[:-1] @ self.filters  # the last frame dropped, as Whisper does
        log_spec = np.log10(np.maximum(mel, 1e-10)).T  # [n_mels, frames]
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)

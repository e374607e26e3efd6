"""VITS text-to-speech over a compiled artifact (see frontends/vits.py for the entries):
characters -> ids (VitsTokenizer's rules, from the manifest) -> `encode_text` -> durations and
alignment in numpy -> `decode_waveform` -> float32 samples at the model's rate.

The random draws (the duration noise, then the prior noise) come from a numpy generator, so a
seed gives the same audio every time. Imports only the TVM runtime, numpy and relaxlm's runtime
modules - never compiler code.
"""

import os
import re
from dataclasses import dataclass

import numpy as np
import tvm

from relaxlm.errors import RelaxlmError

from .loader import load_artifact

MAX_SPEED = 4.0  # OpenAI's range for `speed`: 0.25 .. 4.0
MIN_SPEED = 0.25


class VitsTokenizer:
    """VitsTokenizer without transformers: normalize (vocabulary entries kept, everything else
    lower-cased), keep only vocabulary characters, then ids with blank (id 0) between them."""

    def __init__(self, settings: dict):
        self.vocab = dict(settings["vocab"])
        self.order = [token for token, _ in settings["vocab"]]  # normalize scans in file order
        self.unk_id = settings.get("unk_id")
        self.add_blank = settings["add_blank"]
        self.normalize = settings["normalize"]
        self.is_uroman = settings["is_uroman"]
        self.language = settings.get("language")

    def encode(self, text: str) -> list[int]:
        if self.normalize:
            text = self._normalize(text)
        if self.language == "ron":
            text = text.replace("ț", "ţ")
        if self.is_uroman and re.search(r"[^\x00-\x7F]", text):
            raise RelaxlmError(
                "the text has non-Roman characters and this model reads romanized text; "
                "romanize it first (uroman)"
            )
        if self.normalize:
            text = "".join(c for c in text if c in self.vocab).strip()
        ids = [self.vocab.get(c, self.unk_id) for c in text]
        if None in ids:
            raise RelaxlmError(
                f"character {text[ids.index(None)]!r} is not in this model's vocabulary, which "
                "has no unknown token"
            )
        if self.add_blank:
            blanks = [0] * (2 * len(ids) + 1)
            blanks[1::2] = ids
            ids = blanks
        return ids

    def _normalize(self, text: str) -> str:
        out, i = [], 0
        while i < len(text):
            word = next((w for w in self.order if text.startswith(w, i)), None)
            if word is None:
                out.append(text[i].lower())
                i += 1
            else:
                out.append(word)
                i += len(word)
        return "".join(out)


@dataclass
class Speech:
    """Synthesized audio: mono float32 samples in [-1, 1] at `sampling_rate`."""

    samples: np.ndarray
    sampling_rate: int

    @property
    def duration(self) -> float:
        return self.samples.size / self.sampling_rate


class VitsModel:
    """A compiled VITS artifact on one device, synthesizing one text at a time."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        loaded = load_artifact(folder, device, "synthesize", threads)
        self.folder, self.manifest, self.device = loaded.folder, loaded.manifest, loaded.device
        self.vm, self.params = loaded.vm, loaded.params
        self.speech = self.manifest.speech
        self.sampling_rate = int(self.speech["sampling_rate"])
        self.hop_length = int(self.speech["hop_length"])
        self.tokenizer = VitsTokenizer(self.speech["tokenizer"])
        self.max_tokens = self.manifest.context_window

    def _speaker(self, speaker: int) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.array([speaker], dtype="int32"), self.device)

    def encode_text(
        self, ids: list[int], duration_noise: np.ndarray, speaker: int = 0
    ) -> np.ndarray:
        """Token ids and [1, 2, n] noise -> [2 * flow_size + 1, n]: prior means, prior
        log-variances, log-durations."""
        x = tvm.runtime.tensor(np.array([ids], dtype="int32"), self.device)
        noise = tvm.runtime.tensor(np.ascontiguousarray(duration_noise, np.float32), self.device)
        return self.vm["encode_text"](x, noise, self._speaker(speaker), self.params).numpy()[0]

    def decode_waveform(self, latents: np.ndarray, speaker: int = 0) -> np.ndarray:
        """[flow_size, frames] latents -> [frames * hop_length] samples."""
        x = tvm.runtime.tensor(np.ascontiguousarray(latents[None], np.float32), self.device)
        return self.vm["decode_waveform"](x, self._speaker(speaker), self.params).numpy()[0]

    @property
    def num_speakers(self) -> int:
        return int(self.speech.get("num_speakers", 1))

    def synthesize_ids(
        self,
        ids: list[int],
        speed: float = 1.0,
        rng: np.random.Generator | None = None,
        speaker: int = 0,
    ) -> Speech:
        """Speech for token ids by `speaker` (0 .. num_speakers - 1); rng draws the duration
        noise [1, 2, n], then the prior noise [1, flow_size, frames] (standard normal, scaled by
        the manifest's noise scales)."""
        if not 0 <= speaker < self.num_speakers:
            raise RelaxlmError(
                f"speaker {speaker} is not one of this model's {self.num_speakers} speakers "
                f"(0 .. {self.num_speakers - 1})"
            )
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise RelaxlmError(f"speed={speed!r} is invalid; use a number in [0.25, 4.0]")
        if not ids:
            raise RelaxlmError("the text has no characters this model can speak")
        if len(ids) > self.max_tokens:
            raise RelaxlmError(
                f"the text is {len(ids)} tokens long; this model takes at most "
                f"{self.max_tokens}: split it"
            )
        rng = rng or np.random.default_rng(0)
        s, flow = self.speech, int(self.speech["flow_size"])
        noise = rng.standard_normal((1, 2, len(ids)), dtype=np.float32)
        stats = self.encode_text(ids, noise * np.float32(s["noise_scale_duration"]), speaker)
        means, log_var, log_dur = stats[:flow], stats[flow : 2 * flow], stats[2 * flow]
        length_scale = np.float32(1.0 / (s["speaking_rate"] * speed))
        durations = np.ceil(np.exp(log_dur) * length_scale).astype(np.int64)  # frames per token
        frames = max(int(durations.sum()), 1)
        aligned = np.zeros((2, flow, frames), dtype=np.float32)  # each token over its frames
        aligned[:, :, : durations.sum()] = np.repeat(np.stack([means, log_var]), durations, axis=2)
        prior = rng.standard_normal((1, flow, frames), dtype=np.float32)[0]
        latents = aligned[0] + prior * np.exp(aligned[1]) * np.float32(s["noise_scale"])
        return Speech(self.decode_waveform(latents, speaker), self.sampling_rate)

    def synthesize(self, text: str, speed: float = 1.0, seed: int = 0, speaker: int = 0) -> Speech:
        """Speech for `text` at `speed` (1.0: the model's own rate), reproducible by `seed`."""
        ids = self.tokenizer.encode(text)
        if len(ids) <= int(self.tokenizer.add_blank):  # a lone blank: nothing left to say
            ids = []
        return self.synthesize_ids(ids, speed, np.random.default_rng(seed), speaker)

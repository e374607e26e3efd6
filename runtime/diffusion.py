"""Run a compiled Stable Diffusion artifact (compiler/diffusion.py): the three entries, the
CLIP tokenizer and the scheduler. Arrays in, arrays out; the SDK builds images on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from tvm import relax

from relaxlm.errors import RelaxlmError

from .loader import load_library, open_device
from .schedulers import make_scheduler

ENTRIES = ("encode_text", "denoise", "decode_latents")


class DiffusionModel:
    def __init__(self, folder: str | Path, device: str = "cpu"):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise RelaxlmError(
                f"{self.folder} is not a compiled diffusion artifact (no manifest.json)"
            )
        self.manifest = m = json.loads(path.read_text())
        if m.get("kind") != "diffusion":
            raise RelaxlmError(
                f"{self.folder} is not a diffusion artifact (kind {m.get('kind')!r})"
            )
        self.dev = open_device(device)
        self.height, self.width = m["height"], m["width"]
        self.max_length = m["max_length"]
        self.dtype = m.get("dtype", "float32")
        self._vms, self._weights = {}, {}
        for name in ENTRIES:
            entry = m["entries"][name]
            lib = load_library(self.folder / entry["library"], device)
            self._vms[name] = relax.VirtualMachine(lib, self.dev)
            stored = load_file(str(self.folder / entry["weights"]))
            self._weights[name] = [tvm.runtime.tensor(stored[n], self.dev) for n in entry["params"]]
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer" / "tokenizer.json"))
        cfg = json.loads((self.folder / "tokenizer" / "tokenizer_config.json").read_text())
        self.pad_id = self.tokenizer.token_to_id(cfg.get("pad_token") or "<|endoftext|>")

    def scheduler(self, name: str | None = None):
        return make_scheduler(self.manifest["scheduler"], name)

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """[n, max_length] ids padded as diffusers pads (to max_length) and whether each prompt
        was cut: diffusers keeps the first max_length tokens (end token included)."""
        ids, cut = [], []
        for p in prompts:
            t = self.tokenizer.encode(p).ids
            cut.append(len(t) > self.max_length)
            t = t[: self.max_length - 1] + [t[-1]] if len(t) > self.max_length else t
            ids.append(t + [self.pad_id] * (self.max_length - len(t)))
        return np.array(ids, np.int32), cut

    def _run(self, name: str, *args: np.ndarray) -> np.ndarray:
        inputs = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in args]
        return self._vms[name]["forward"](*inputs, self._weights[name]).numpy().astype(np.float32)

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        return self._run("encode_text", ids.astype(np.int32))

    def denoise(self, latents: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        return self._run(
            "denoise",
            latents.astype(self.dtype),
            timestep.astype(np.float32),
            context.astype(self.dtype),
        )

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents -> [n, 3, h, w] image in [-1, 1] (not clamped)."""
        return self._run(
            "decode_latents", (latents / self.manifest["vae_scaling_factor"]).astype(self.dtype)
        )

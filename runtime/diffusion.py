"""Run a compiled Stable Diffusion or FLUX artifact (compiler/diffusion.py): the entries, the
tokenizers and the scheduler. Arrays in, arrays out; the SDK builds images on it."""

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
from .schedulers import make_flow_match_scheduler, make_scheduler


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
        for name, entry in m["entries"].items():
            lib = load_library(self.folder / entry["library"], device)
            self._vms[name] = relax.VirtualMachine(lib, self.dev)
            stored = load_file(str(self.folder / entry["weights"]))
            self._weights[name] = [tvm.runtime.tensor(stored[n], self.dev) for n in entry["params"]]
        self.tokenizer, self.pad_id = _tokenizer(self.folder / "tokenizer", "<|endoftext|>")

    def scheduler(self, name: str | None = None):
        return make_scheduler(self.manifest["scheduler"], name)

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """[n, max_length] ids padded as diffusers pads (to max_length) and whether each prompt
        was cut: diffusers keeps the first max_length tokens (end token included)."""
        return _pad(self.tokenizer, self.pad_id, self.max_length, prompts)

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
        m = self.manifest
        z = latents / np.float32(m["vae_scaling_factor"]) + np.float32(m.get("vae_shift_factor", 0))
        return self._run("decode_latents", z.astype(self.dtype))


class FluxModel(DiffusionModel):
    """A FLUX artifact: CLIP (pooled), T5, the flow transformer and the VAE decoder."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        super().__init__(folder, device)
        self.max_length_2 = self.manifest["max_length_2"]
        self.tokenizer_2, self.pad_id_2 = _tokenizer(self.folder / "tokenizer_2", "<pad>")

    def scheduler(self, name: str | None = None):
        if name not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise RelaxlmError(
                f"scheduler {name!r} is not supported for FLUX; leave it unset "
                "(FlowMatchEulerDiscreteScheduler)"
            )
        return make_flow_match_scheduler(self.manifest["scheduler"])

    def tokenize_2(self, prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """T5 ids, padded and cut to max_length_2 as FluxPipeline does."""
        return _pad(self.tokenizer_2, self.pad_id_2, self.max_length_2, prompts)

    def pooled_text(self, ids: np.ndarray) -> np.ndarray:
        """CLIP's pooled output: the last hidden state at each prompt's end token (the first
        `eos_token_id`, or the largest id for the legacy eos_token_id 2, as transformers)."""
        states = self.encode_text(ids)
        eos = self.manifest["clip_eos_token_id"]
        at = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
        return states[np.arange(len(ids)), at]

    def encode_text_2(self, ids: np.ndarray) -> np.ndarray:
        return self._run("encode_text_2", ids.astype(np.int32))

    def rope(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin) [text + image tokens, head_dim] for zero text ids and `image_ids`, each
        axis its share of the head, computed in float64 as diffusers does on the CPU."""
        ids = np.concatenate([np.zeros((self.max_length_2, 3)), image_ids]).astype(np.float64)
        cos, sin = [], []
        for axis, dim in enumerate(self.manifest["axes_dims_rope"]):
            freqs = 1.0 / 10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
            angles = np.repeat(np.outer(ids[:, axis], freqs), 2, axis=1)  # [s, dim], pairs
            cos.append(np.cos(angles))
            sin.append(np.sin(angles))
        return (
            np.concatenate(cos, 1).astype(np.float32),
            np.concatenate(sin, 1).astype(np.float32),
        )

    def denoise(self, latents, sigma, context, pooled, guidance, rope) -> np.ndarray:
        """Packed latents [n, tokens, c*4] -> velocity; `sigma` and `guidance` are [n]."""
        return self._run(
            "denoise",
            latents.astype(self.dtype),
            context.astype(self.dtype),
            pooled.astype(self.dtype),
            sigma.astype(np.float32),
            guidance.astype(np.float32),
            *rope,
        )


def open_model(folder: str | Path, device: str = "cpu") -> DiffusionModel:
    """The runtime model for the pipeline the artifact's manifest names."""
    path = Path(folder) / "manifest.json"
    pipeline = json.loads(path.read_text()).get("pipeline") if path.is_file() else None
    return (FluxModel if pipeline == "FluxPipeline" else DiffusionModel)(folder, device)


def _tokenizer(folder: Path, default_pad: str) -> tuple[Tokenizer, int]:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    return tokenizer, tokenizer.token_to_id(cfg.get("pad_token") or default_pad)


def _pad(
    tokenizer: Tokenizer, pad_id: int, length: int, prompts: list[str]
) -> tuple[np.ndarray, list[bool]]:
    ids, cut = [], []
    for p in prompts:
        t = tokenizer.encode(p).ids
        cut.append(len(t) > length)
        t = t[: length - 1] + [t[-1]] if len(t) > length else t
        ids.append(t + [pad_id] * (length - len(t)))
    return np.array(ids, np.int32), cut

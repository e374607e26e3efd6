"""Text-to-image on a compiled Stable Diffusion artifact: `ImagePipeline(path).generate(prompt)`.

The loop is diffusers' `StableDiffusionPipeline.__call__`: encode the prompt (and the empty
negative prompt), then per step run the UNet on both, mix them by classifier-free guidance
and let the scheduler step; decode the latents with the VAE. Image i of a request starts from
the noise of seed + i, so a seed gives the same image alone or in a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.diffusion import DiffusionModel

logger = logging.getLogger(__name__)


@dataclass
class ImageResult:
    images: list  # PIL.Image.Image
    pixels: np.ndarray  # [n, h, w, 3] float32 in [0, 1], before rounding to bytes
    truncated: bool  # the prompt was longer than the text encoder reads and was cut


class ImagePipeline:
    def __init__(self, path: str, device: str = "cpu"):
        self.model = DiffusionModel(path, device)
        self.height, self.width = self.model.height, self.model.width

    def initial_noise(self, seed: int, n: int) -> np.ndarray:
        m = self.model.manifest
        c, f = m["latent_channels"], m["vae_scale_factor"]
        h, w = self.height // f, self.width // f
        return np.stack(
            [
                np.random.default_rng(seed + i).standard_normal((c, h, w)).astype(np.float32)
                for i in range(n)
            ]
        )

    def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        negative_prompt: str = "",
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> ImageResult:
        """n images for `prompt`. `latents` ([n, 4, h/f, w/f], f the VAE's scale factor)
        replaces the seeded noise."""
        if n < 1:
            raise RelaxlmError(f"n must be at least 1, got {n}")
        m = self.model
        ids, cut = m.tokenize([prompt])
        if cut[0]:
            logger.warning("prompt truncated to the text encoder's %d tokens", m.max_length)
        cond = m.encode_text(ids)
        guided = guidance_scale > 1.0
        if guided:
            uncond = m.encode_text(m.tokenize([negative_prompt])[0])
            context = np.concatenate([np.repeat(uncond, n, 0), np.repeat(cond, n, 0)])
        else:
            context = np.repeat(cond, n, 0)
        sched = m.scheduler(scheduler)
        timesteps = sched.timesteps(steps)
        x = self.initial_noise(seed, n) if latents is None else latents.astype(np.float32)
        x = x * np.float32(sched.init_noise_sigma)
        for i, t in enumerate(timesteps):
            inp = sched.scale_input(x, i)
            inp = np.concatenate([inp, inp]) if guided else inp
            eps = m.denoise(inp, np.full(len(inp), t, np.float32), context)
            if guided:
                uncond_eps, text_eps = eps[:n], eps[n:]
                eps = uncond_eps + np.float32(guidance_scale) * (text_eps - uncond_eps)
            x = sched.step(eps, t, x, i)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        image = m.decode_latents(x)
        pixels = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)
        return ImageResult(_to_pil(pixels), pixels, cut[0])


def _to_pil(pixels: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def seconds_per_step(pipe: ImagePipeline, steps: int = 5, repeats: int = 3) -> float:
    """Median wall time between consecutive denoising steps (guided, one image), over
    `repeats` generations after one warm-up."""
    gaps: list[float] = []
    for run in range(repeats + 1):
        stamps: list[float] = []
        pipe.generate("a photo", steps=steps, seed=run, on_step=_stamp(stamps))
        if run:
            gaps += list(np.diff(stamps))
    return float(np.median(gaps))


def _stamp(stamps: list[float]) -> Callable[[int, int], None]:
    import time

    return lambda done, total: stamps.append(time.perf_counter())

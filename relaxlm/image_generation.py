"""Text-to-image on a compiled Stable Diffusion or FLUX artifact:
`ImagePipeline(path).generate(prompt)`.

Stable Diffusion's loop is diffusers' `StableDiffusionPipeline.__call__`: encode the prompt
(and the empty negative prompt), then per step run the UNet on both, mix them by
classifier-free guidance and let the scheduler step; decode the latents with the VAE. FLUX's is
`FluxPipeline.__call__`: CLIP's pooled prompt and T5's states condition the transformer, which
predicts a velocity over 2x2-packed latent patches, the guidance scale an input of the model
(no second pass). Image i of a request starts from the noise of seed + i, so a seed gives the
same image alone or in a batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.diffusion import FluxModel, open_model

logger = logging.getLogger(__name__)


@dataclass
class ImageResult:
    images: list  # PIL.Image.Image
    pixels: np.ndarray  # [n, h, w, 3] float32 in [0, 1], before rounding to bytes
    truncated: bool  # the prompt was longer than the text encoder reads and was cut


class ImagePipeline:
    def __init__(self, path: str, device: str = "cpu"):
        self.model = open_model(path, device)
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
        guidance_scale: float | None = None,
        seed: int = 0,
        negative_prompt: str = "",
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> ImageResult:
        """n images for `prompt`. `latents` ([n, 4, h/f, w/f], f the VAE's scale factor)
        replaces the seeded noise. guidance_scale defaults to 7.5 (Stable Diffusion's
        classifier-free guidance) or 3.5 (FLUX's guidance embedding, as FluxPipeline)."""
        if n < 1:
            raise RelaxlmError(f"n must be at least 1, got {n}")
        if isinstance(self.model, FluxModel):
            if negative_prompt:
                raise RelaxlmError(
                    "negative_prompt is not supported for FLUX (its guidance is distilled into "
                    "the model); leave it empty"
                )
            return self._generate_flux(
                prompt,
                n,
                steps,
                3.5 if guidance_scale is None else guidance_scale,
                seed,
                scheduler,
                latents,
                on_step,
            )
        guidance_scale = 7.5 if guidance_scale is None else guidance_scale
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
        return _result(image, cut[0])

    def _generate_flux(
        self, prompt, n, steps, guidance_scale, seed, scheduler, latents, on_step
    ) -> ImageResult:
        m = self.model
        ids, cut = m.tokenize([prompt])
        ids_2, cut_2 = m.tokenize_2([prompt])
        if cut[0] or cut_2[0]:
            logger.warning(
                "prompt truncated to the text encoders' %d / %d tokens",
                m.max_length,
                m.max_length_2,
            )
        pooled = np.repeat(m.pooled_text(ids), n, 0)
        context = np.repeat(m.encode_text_2(ids_2), n, 0)
        x = self.initial_noise(seed, n) if latents is None else latents.astype(np.float32)
        h, w = x.shape[2:]
        x = pack_latents(x)  # [n, image tokens, c*4]
        image_ids = np.zeros((h // 2, w // 2, 3))
        image_ids[..., 1] += np.arange(h // 2)[:, None]
        image_ids[..., 2] += np.arange(w // 2)[None, :]
        rope = m.rope(image_ids.reshape(-1, 3))
        sched = m.scheduler(scheduler)
        timesteps = sched.timesteps(steps, x.shape[1])
        guidance = np.full(n, guidance_scale, np.float32)
        for i, t in enumerate(timesteps):
            sigma = np.full(n, t, np.float32) / np.float32(1000)
            velocity = m.denoise(x, sigma, context, pooled, guidance, rope)
            x = sched.step(velocity, x, i)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        image = m.decode_latents(unpack_latents(x, h, w))
        return _result(image, cut[0] or cut_2[0])


def pack_latents(x: np.ndarray) -> np.ndarray:
    """[n, c, h, w] -> [n, (h/2)(w/2), c*4]: one token per 2x2 patch, channels outermost."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """pack_latents' inverse, to [n, c, h, w]."""
    n, _, d = x.shape
    x = x.reshape(n, h // 2, w // 2, d // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def _result(image: np.ndarray, truncated: bool) -> ImageResult:
    """The VAE's [n, 3, h, w] image in [-1, 1] as pixels [n, h, w, 3] in [0, 1] and PIL images."""
    from PIL import Image

    pixels = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)
    images = [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
    return ImageResult(images, pixels, truncated)


@dataclass(frozen=True)
class ImageTimings:
    seconds_per_step: float  # median gap between consecutive denoising steps
    seconds_per_image: float  # median whole generation: text encoders, `steps` steps, VAE
    steps: int


def image_timings(pipe: ImagePipeline, steps: int = 5, repeats: int = 3) -> ImageTimings:
    """Wall times of one-image generations at the pipeline's default guidance, over `repeats`
    generations after one warm-up."""
    gaps: list[float] = []
    images: list[float] = []
    for run in range(repeats + 1):
        stamps: list[float] = []
        start = time.perf_counter()
        pipe.generate("a photo", steps=steps, seed=run, on_step=_stamp(stamps))
        if run:
            images.append(time.perf_counter() - start)
            gaps += list(np.diff(stamps))
    return ImageTimings(float(np.median(gaps)), float(np.median(images)), steps)


def _stamp(stamps: list[float]) -> Callable[[int, int], None]:
    return lambda done, total: stamps.append(time.perf_counter())

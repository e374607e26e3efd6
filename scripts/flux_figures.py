"""Figures for the README: max abs errors of each FLUX component and of a 4-step generation vs
diffusers/transformers (float32), and seconds per step, on the tiny random test model of
tests/test_flux.py.

Run: python scripts/flux_figures.py (from the repository root)."""

import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import numpy as np
import test_flux as T
import torch

from relaxlm.compiler.diffusion import compile_diffusion
from relaxlm.image_generation import ImagePipeline, image_timings, pack_latents
from relaxlm.testing.tiny_diffusion import tiny_flux


def err(ours, ref):
    """max abs error, and the reference's largest magnitude it is measured against"""
    return f"{float(np.abs(ours - ref).max()):.2e} (of {float(np.abs(ref).max()):.2f})"


root = pathlib.Path(tempfile.mkdtemp())
pipe = tiny_flux(root)
compile_diffusion(
    root / "flux", root / "a", height=T.SIZE, width=T.SIZE, max_sequence_length=32, progress=False
)
ours = ImagePipeline(str(root / "a"))
m = ours.model
ids, _ = m.tokenize(["a red fox"])
ids_2, _ = m.tokenize_2(["a red fox"])
with torch.no_grad():
    pooled = pipe.text_encoder(torch.from_numpy(ids).long()).pooler_output.numpy()
    states = pipe.text_encoder_2(torch.from_numpy(ids_2).long())[0].numpy()
print("CLIP pooled", err(m.pooled_text(ids), pooled))
print("T5", err(m.encode_text_2(ids_2), states))
rng = np.random.default_rng(1)
x = rng.standard_normal((2, 64, 16)).astype(np.float32)
ctx = rng.standard_normal((2, 32, 32)).astype(np.float32)
pool = rng.standard_normal((2, 32)).astype(np.float32)
sigma, guidance = np.array([0.95, 0.3], np.float32), np.array([3.5, 1.0], np.float32)
image_ids = pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
with torch.no_grad():
    r = pipe.transformer(
        hidden_states=torch.from_numpy(x),
        encoder_hidden_states=torch.from_numpy(ctx),
        pooled_projections=torch.from_numpy(pool),
        timestep=torch.from_numpy(sigma),
        guidance=torch.from_numpy(guidance),
        img_ids=image_ids,
        txt_ids=torch.zeros(32, 3),
    ).sample.numpy()
print("transformer", err(m.denoise(x, sigma, ctx, pool, guidance, m.rope(image_ids.numpy())), r))
z = rng.standard_normal((1, 4, T.LATENT, T.LATENT)).astype(np.float32)
c = pipe.vae.config
with torch.no_grad():
    r = pipe.vae.decode(torch.from_numpy(z) / c.scaling_factor + c.shift_factor).sample.numpy()
print("VAE decode", err(m.decode_latents(z), r))
noise = ours.initial_noise(7, 2)
ref = pipe(
    "a red fox",
    num_inference_steps=4,
    guidance_scale=3.5,
    num_images_per_prompt=2,
    latents=torch.from_numpy(pack_latents(noise)),
    output_type="np",
    height=T.SIZE,
    width=T.SIZE,
    max_sequence_length=32,
).images
print("4-step pixels", err(ours.generate("a red fox", n=2, steps=4, seed=7).pixels, ref))
print(f"s/step {image_timings(ours, 5, 3).seconds_per_step:.4f} ({T.SIZE}x{T.SIZE}, one image)")

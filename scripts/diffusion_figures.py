"""Figures for the README and reports: errors of each Stable Diffusion component and of 4-step
generations vs diffusers, float32 and q8, and seconds per step, on the tiny random test model.

Run: python scripts/diffusion_figures.py (from the repository root)."""

import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import diffusers
import numpy as np
import test_diffusion as T
import torch

from relaxlm.compiler.diffusion import compile_diffusion
from relaxlm.image_generation import ImagePipeline, image_timings
from relaxlm.testing.tiny_diffusion import tiny_stable_diffusion

root = pathlib.Path(tempfile.mkdtemp())
pipe = tiny_stable_diffusion(root, False)
compile_diffusion(root / "sd", root / "a", height=16, width=16, progress=False)
compile_diffusion(root / "sd", root / "q8", height=16, width=16, progress=False, quant="q8")
ours, q8 = ImagePipeline(str(root / "a")), ImagePipeline(str(root / "q8"))
m = ours.model
ids, _ = m.tokenize(["a red fox"])
with torch.no_grad():
    ref = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
print("text encoder rel", T._rel(m.encode_text(ids), ref))
rng = np.random.default_rng(1)
x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
t = np.array([981.0, 21.0], np.float32)
ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
with torch.no_grad():
    r = pipe.unet(
        torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)
    ).sample.numpy()
print(
    "unet rel",
    T._rel(m.denoise(x, t, ctx), r),
    "q8 unet rel",
    T._rel(q8.model.denoise(x, t, ctx), r),
)
z = x[:1]
with torch.no_grad():
    r = pipe.vae.decode(torch.from_numpy(z) / pipe.vae.config.scaling_factor).sample.numpy()
print("vae rel", T._rel(m.decode_latents(z), r))
for s in ["DDIMScheduler", "EulerDiscreteScheduler"]:
    pipe.scheduler = getattr(diffusers, s).from_config(
        json.load(open(root / "sd/scheduler/scheduler_config.json"))
    )
    noise = ours.initial_noise(7, 2)
    ref = pipe(
        "a red fox",
        num_inference_steps=4,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        latents=torch.from_numpy(noise),
        output_type="np",
        height=16,
        width=16,
    ).images
    print(
        s,
        "4-step max pixel err",
        float(
            np.abs(ours.generate("a red fox", n=2, steps=4, seed=7, scheduler=s).pixels - ref).max()
        ),
        "q8",
        float(
            np.abs(q8.generate("a red fox", n=2, steps=4, seed=7, scheduler=s).pixels - ref).max()
        ),
    )
for name, pipeline in (("f32", ours), ("q8", q8)):
    print("s/step", name, image_timings(pipeline, 5, 3).seconds_per_step)

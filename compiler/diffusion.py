"""Compile a diffusers Stable Diffusion folder into one artifact folder: a library per
component entry (`encode_text`, `denoise`, `decode_latents`), its weights in the entry's
parameter order, the CLIP tokenizer as tokenizer.json and a manifest the runtime reads.

The entries are plain graphs (no KV cache, no attention rewrite). The CPU build is TVM's
default Relax pipeline; GPU targets run phases 2-4 of compiler/pipeline.py (legalize and fuse,
the target's schedules, VM lowering). `height`/`width` fix the latent size; batch stays
symbolic.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tvm
from safetensors.numpy import save_file
from tvm import relax

from relaxlm._version import __version__
from relaxlm.errors import RelaxlmError
from relaxlm.frontends.diffusion import components, export_component, read_checkpoint

from . import schedules
from .cpu_legalize import legalizations
from .targets import build_context, resolve_targets

MANIFEST = "manifest.json"


def compile_diffusion(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str = "cpu",
    height: int = 512,
    width: int = 512,
    dtype: str = "float32",
    progress: bool = True,
    device_binaries: bool = True,
) -> Path:
    """Build the artifact for images of `height` x `width` pixels (multiples of the VAE's
    scale factor, 8 for Stable Diffusion), weights and activations in `dtype` (float32 or
    float16). device_binaries=False keeps CUDA kernels as source (no nvcc), as
    compiler/pipeline.py's `build_library` does."""
    if dtype not in ("float32", "float16"):
        raise RelaxlmError(
            f"dtype {dtype!r} is not supported for diffusion models (float32, float16)"
        )
    ckpt = read_checkpoint(model)
    (preset,) = resolve_targets(target)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda msg: None)
    entries = {}
    for comp in components(ckpt, height, width, dtype):
        start = time.perf_counter()
        mod, params = export_component(comp)
        if preset.is_gpu:
            mod = _legalize_and_schedule(mod, preset)
        with build_context(preset, device_binaries):
            executable = relax.build(mod, target=preset.target())
        library = f"{comp.name}.{preset.name}.so"
        executable.export_library(str(out / library))
        names = [n for n, _ in params]
        save_file(
            {n: np.ascontiguousarray(comp.weights[n]) for n in names},
            str(out / f"{comp.name}.safetensors"),
        )
        entries[comp.name] = {
            "library": library,
            "weights": f"{comp.name}.safetensors",
            "params": names,
        }
        say(f"{comp.name}: compiled in {time.perf_counter() - start:.1f} s")
    _save_tokenizer(ckpt.tokenizer_dir, out / "tokenizer")
    manifest = {
        "kind": "diffusion",
        "relaxlm_version": __version__,
        "source": str(Path(model).resolve()),
        "target": preset.name,
        "device": preset.device,
        "dtype": dtype,
        "height": height,
        "width": width,
        "max_length": ckpt.text.max_position_embeddings,
        "latent_channels": ckpt.vae.latent_channels,
        "vae_scale_factor": ckpt.vae.scale_factor,
        "vae_scaling_factor": ckpt.vae.scaling_factor,
        "scheduler": ckpt.scheduler,
        "entries": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def _legalize_and_schedule(mod: tvm.IRModule, preset) -> tvm.IRModule:
    """Phases 2 and 3 of compiler/pipeline.py: Relax ops to fused TIR, then the GPU schedules."""
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(legalizations(preset.device)),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
    )(mod)
    with preset.target():
        return schedules.for_target(preset)(mod)


def _save_tokenizer(src: Path, dst: Path) -> None:
    """The CLIP tokenizer as tokenizer.json (what the runtime's `tokenizers` reads)."""
    from transformers import AutoTokenizer

    if dst.exists():
        shutil.rmtree(dst)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    if not (dst / "tokenizer.json").is_file():
        raise RelaxlmError(f"{src}: the tokenizer could not be saved as tokenizer.json")

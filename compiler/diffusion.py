"""Compile a diffusers Stable Diffusion or FLUX folder into one artifact folder: a library per
component entry (`encode_text`, `denoise`, `decode_latents`; FLUX adds `encode_text_2`), its
weights in the entry's parameter order, the tokenizers as tokenizer.json and a manifest.

The entries are plain graphs (no KV cache, no attention rewrite). Every target runs
compiler/pipeline.py's legalize and fuse (its bfloat16 norms among them) and VM lowering; GPU
targets also its schedules. `height`/`width` fix the latent size; batch stays
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
from .cpu_legalize import legalize_and_fuse
from .fuse_dequantize_matmul import FuseDequantizeMatmul
from .int8_dot import int8_dot_flavour
from .quantization import quantize, resolve_scheme
from .quantize_weights import quantize_weights
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
    quant: str = "none",
    progress: bool = True,
    device_binaries: bool = True,
    max_sequence_length: int = 512,
) -> Path:
    """Build the artifact for images of `height` x `width` pixels (multiples of the VAE's
    scale factor, 8 for Stable Diffusion), weights and activations in `dtype` (float32,
    float16 or bfloat16). device_binaries=False keeps CUDA kernels as source (no nvcc), as
    compiler/pipeline.py's `build_library` does. quant "q8" ("q4") stores the denoiser's
    linear weights (attention projections, feed-forwards, time embedding) as 8-bit (4-bit)
    codes with a scale per 32; convolutions, the text encoders and the VAE stay in `dtype`.
    max_sequence_length fixes FLUX's T5 prompt length (FluxPipeline's default, 512)."""
    if quant not in ("none", "q8", "q4"):
        raise RelaxlmError(f"quant {quant!r} is not supported for diffusion models (none, q8, q4)")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise RelaxlmError(
            f"dtype {dtype!r} is not supported for diffusion models (float32, float16, bfloat16)"
        )
    ckpt = read_checkpoint(model, max_sequence_length)
    (preset,) = resolve_targets(target)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda msg: None)
    entries = {}
    for comp in components(ckpt, height, width, dtype):
        start = time.perf_counter()
        mod, params = export_component(comp)
        names = [n for n, _ in params]
        fields = None
        if quant != "none" and comp.name == "denoise":
            mod, fields = quantize_weights(mod, resolve_scheme(quant), dtype)
            mod = FuseDequantizeMatmul(
                int8_dot=int8_dot_flavour(preset.target()), gpu=preset.is_gpu
            )(mod)
        mod = _legalize_and_schedule(mod, preset)
        with build_context(preset, device_binaries):
            executable = relax.build(mod, target=preset.target())
        library = f"{comp.name}.{preset.name}.so"
        executable.export_library(str(out / library))
        tensors = _packed(comp.weights, names, fields, dtype)
        save_file(tensors, str(out / f"{comp.name}.safetensors"))
        entries[comp.name] = {
            "library": library,
            "weights": f"{comp.name}.safetensors",
            "params": list(tensors),
        }
        say(f"{comp.name}: compiled in {time.perf_counter() - start:.1f} s")
    for name, src in ckpt.tokenizers().items():
        _save_tokenizer(src, out / name)
    manifest = {
        "kind": "diffusion",
        "relaxlm_version": __version__,
        "source": str(Path(model).resolve()),
        "target": preset.name,
        "device": preset.device,
        "dtype": dtype,
        "quant": quant,
        "height": height,
        "width": width,
        **ckpt.manifest(),
        "entries": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def _packed(weights: dict, names: list[str], fields, dtype: str) -> dict[str, np.ndarray]:
    """The entry's weight tensors in its parameter order; a quantized weight as its parts
    (`NAME.q`, `NAME.scale`), packed by compiler/quantization.py."""
    if fields is None:
        return {n: np.ascontiguousarray(weights[n]) for n in names}
    out, parts = {}, {}
    for f in fields:
        name = names[f.source]
        if f.part == "":
            out[name] = np.ascontiguousarray(weights[name])
            continue
        if name not in parts:
            order = list(f.scheme.part_shapes(*weights[name].shape))
            parts[name] = dict(
                zip(order, quantize(f.scheme, weights[name], np.dtype(dtype)), strict=True)
            )
        out[f"{name}.{f.part}"] = np.ascontiguousarray(parts[name][f.part])
    return out


def _legalize_and_schedule(mod: tvm.IRModule, preset) -> tvm.IRModule:
    """Phases 2 and 3 of compiler/pipeline.py: Relax ops to fused TIR (relaxlm's legalizations:
    bfloat16 norms among them), then on GPUs the GPU schedules."""
    mod = legalize_and_fuse(mod, preset.device)
    if not preset.is_gpu:
        return mod
    with preset.target():
        return schedules.for_target(preset)(mod)


def _save_tokenizer(src: Path, dst: Path) -> None:
    """A tokenizer (CLIP's, T5's) as tokenizer.json (what the runtime's `tokenizers` reads)."""
    from transformers import AutoTokenizer

    if dst.exists():
        shutil.rmtree(dst)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    if not (dst / "tokenizer.json").is_file():
        raise RelaxlmError(f"{src}: the tokenizer could not be saved as tokenizer.json")

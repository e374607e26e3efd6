"""Stable Diffusion 1.x/2.x from a diffusers folder (model_index.json plus one folder per
component): the CLIP text encoder, the UNet and the VAE decoder, each an entry function of
one module (`encode_text`, `denoise`, `decode_latents`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .clip_text import CLIPTextConfig, CLIPTextModel
from .unet import UNet2DConditionConfig, UNet2DConditionModel
from .vae import AutoencoderKLConfig, AutoencoderKLDecoder

logger = logging.getLogger(__name__)

COMPONENTS = {  # folder -> (config class, module class)
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "unet": (UNet2DConditionConfig, UNet2DConditionModel),
    "vae": (AutoencoderKLConfig, AutoencoderKLDecoder),
}


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _weights(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RelaxlmError(f"{folder} holds no .safetensors weights")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@dataclass
class Component:
    name: str  # the entry function
    module: nn.Module
    spec: dict[str, nn.spec.Tensor]
    weights: dict[str, np.ndarray]


@dataclass
class DiffusionCheckpoint:
    path: Path
    index: dict[str, Any]
    text: CLIPTextConfig
    unet: UNet2DConditionConfig
    vae: AutoencoderKLConfig
    scheduler: dict[str, Any]
    tokenizer_dir: Path


def read_checkpoint(path: str | Path) -> DiffusionCheckpoint:
    path = Path(path)
    if not is_diffusers_folder(path):
        raise RelaxlmError(f"{path} is not a diffusers folder (no model_index.json)")
    index = _read_json(path / "model_index.json")
    missing = [c for c in (*COMPONENTS, "scheduler", "tokenizer") if c not in index]
    if missing:
        raise RelaxlmError(f"{path}/model_index.json lacks components: {', '.join(missing)}")
    cfg = {c: COMPONENTS[c][0].from_dict(_read_json(path / c / "config.json")) for c in COMPONENTS}
    return DiffusionCheckpoint(
        path,
        index,
        cfg["text_encoder"],
        cfg["unet"],
        cfg["vae"],
        _read_json(path / "scheduler" / "scheduler_config.json"),
        path / "tokenizer",
    )


def _load(module: nn.Module, folder: Path, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The checkpoint tensors for `module`'s parameters, checked both ways. transformers 5
    saves CLIPTextModel without its `text_model.` prefix; either spelling is read."""
    stored = _weights(folder)
    params = dict(module.named_parameters())
    names = {n: n if n in stored else n.removeprefix("text_model.") for n in params}
    missing = [n for n, s in names.items() if s not in stored]
    if missing:
        raise RelaxlmError(f"{folder}: missing weights: {', '.join(missing)}")
    unused = set(stored) - set(names.values())
    if (
        unused and folder.name != "vae"
    ):  # vae/ also holds the encoder, which text-to-image never runs
        logger.warning("%s: %d unused tensors, e.g. %s", folder, len(unused), sorted(unused)[0])
    out = {}
    for n, p in params.items():
        w = stored[names[n]]
        if tuple(w.shape) != tuple(int(d) for d in p.shape):
            raise RelaxlmError(
                f"{folder}: {names[n]} has shape {w.shape}, the model wants {p.shape}"
            )
        out[n] = w.astype(dtype)
    return out


def components(
    ckpt: DiffusionCheckpoint, height: int, width: int, dtype: str = "float32", batch: str = "batch"
) -> list[Component]:
    """The three entry functions with their input specs and weights in `dtype` (float32 or
    float16; timesteps stay float32), for images of `height` x `width` pixels."""
    f = ckpt.vae.scale_factor
    if height % f or width % f:
        raise RelaxlmError(f"image size {width}x{height} must be a multiple of {f} in each side")
    lh, lw = height // f, width // f
    text = CLIPTextModel(ckpt.text)
    unet = UNet2DConditionModel(ckpt.unet)
    vae = AutoencoderKLDecoder(ckpt.vae)
    seq = ckpt.text.max_position_embeddings
    for module in (text, unet, vae):
        module.to(dtype)
    # The decoder's own weights live under `decoder.` and `post_quant_conv.` in vae/; its
    # encoder half is not loaded (text-to-image never encodes an image).
    return [
        Component(
            "encode_text",
            text,
            {"input_ids": nn.spec.Tensor([batch, seq], "int32")},
            _load(text, ckpt.path / "text_encoder", dtype),
        ),
        Component(
            "denoise",
            unet,
            {
                "sample": nn.spec.Tensor([batch, ckpt.unet.in_channels, lh, lw], dtype),
                "timestep": nn.spec.Tensor([batch], "float32"),
                "context": nn.spec.Tensor([batch, seq, ckpt.unet.cross_attention_dim], dtype),
            },
            _load(unet, ckpt.path / "unet", dtype),
        ),
        Component(
            "decode_latents",
            vae,
            {"latents": nn.spec.Tensor([batch, ckpt.vae.latent_channels, lh, lw], dtype)},
            _load(vae, ckpt.path / "vae", dtype),
        ),
    ]


def export_component(comp: Component):
    """(IRModule with one function named after the component, [(param name, nn.Parameter)])."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    return comp.module.export_tvm(spec={"forward": {**comp.spec, "$": modes}})

"""Stable Diffusion 1.x/2.x and FLUX from a diffusers folder (model_index.json plus one folder
per component), each component an entry function of one module: Stable Diffusion's CLIP text
encoder, UNet and VAE decoder (`encode_text`, `denoise`, `decode_latents`); FLUX's CLIP
(`encode_text`), T5 (`encode_text_2`), transformer (`denoise`) and VAE decoder."""

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
from .flux import FluxTransformer2DModel, FluxTransformerConfig
from .t5 import T5Config, T5EncoderModel
from .unet import UNet2DConditionConfig, UNet2DConditionModel
from .vae import AutoencoderKLConfig, AutoencoderKLDecoder

logger = logging.getLogger(__name__)

COMPONENTS = {  # folder -> (config class, module class)
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "unet": (UNet2DConditionConfig, UNet2DConditionModel),
    "vae": (AutoencoderKLConfig, AutoencoderKLDecoder),
}


FLUX_COMPONENTS = {
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "text_encoder_2": (T5Config, T5EncoderModel),
    "transformer": (FluxTransformerConfig, FluxTransformer2DModel),
    "vae": (AutoencoderKLConfig, AutoencoderKLDecoder),
}
PIPELINES = ("StableDiffusionPipeline", "FluxPipeline")


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

    def tokenizers(self) -> dict[str, Path]:
        """Artifact folder -> the checkpoint's tokenizer folder."""
        return {"tokenizer": self.tokenizer_dir}

    def manifest(self) -> dict[str, Any]:
        """What the runtime needs beyond the entries."""
        return {
            "pipeline": "StableDiffusionPipeline",
            "max_length": self.text.max_position_embeddings,
            "latent_channels": self.vae.latent_channels,
            "vae_scale_factor": self.vae.scale_factor,
            "vae_scaling_factor": self.vae.scaling_factor,
            "scheduler": self.scheduler,
        }


@dataclass
class FluxCheckpoint:
    path: Path
    index: dict[str, Any]
    text: CLIPTextConfig
    text_2: T5Config
    transformer: FluxTransformerConfig
    vae: AutoencoderKLConfig
    scheduler: dict[str, Any]
    max_sequence_length: int  # T5 tokens, fixed at compile time as FluxPipeline's default 512

    def tokenizers(self) -> dict[str, Path]:
        return {"tokenizer": self.path / "tokenizer", "tokenizer_2": self.path / "tokenizer_2"}

    def manifest(self) -> dict[str, Any]:
        t = self.transformer
        return {
            "pipeline": "FluxPipeline",
            "max_length": self.text.max_position_embeddings,
            "max_length_2": self.max_sequence_length,
            "clip_eos_token_id": self.text.extra.get("eos_token_id", 2),
            "latent_channels": self.vae.latent_channels,
            "vae_scale_factor": self.vae.scale_factor,
            "vae_scaling_factor": self.vae.scaling_factor,
            "vae_shift_factor": self.vae.shift_factor or 0.0,
            "guidance_embeds": t.guidance_embeds,
            "axes_dims_rope": list(t.axes_dims_rope),
            "scheduler": self.scheduler,
        }


def read_checkpoint(
    path: str | Path, max_sequence_length: int = 512
) -> DiffusionCheckpoint | FluxCheckpoint:
    """The configs of a diffusers folder; `max_sequence_length` is FLUX's T5 length."""
    path = Path(path)
    if not is_diffusers_folder(path):
        raise RelaxlmError(f"{path} is not a diffusers folder (no model_index.json)")
    index = _read_json(path / "model_index.json")
    kind = index.get("_class_name", "StableDiffusionPipeline")
    if kind not in PIPELINES:
        raise RelaxlmError(
            f"{path}/model_index.json: pipeline {kind!r} is not supported ({', '.join(PIPELINES)})"
        )
    if kind == "FluxPipeline":
        return _read_flux(path, index, max_sequence_length)
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


def _read_flux(path: Path, index: dict[str, Any], max_sequence_length: int) -> FluxCheckpoint:
    needed = (*FLUX_COMPONENTS, "scheduler", "tokenizer", "tokenizer_2")
    missing = [c for c in needed if c not in index]
    if missing:
        raise RelaxlmError(f"{path}/model_index.json lacks components: {', '.join(missing)}")
    cfg = {
        c: FLUX_COMPONENTS[c][0].from_dict(_read_json(path / c / "config.json"))
        for c in FLUX_COMPONENTS
    }
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    if scheduler.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise RelaxlmError(
            f"{path}/scheduler: {scheduler.get('_class_name')!r} is not supported for FLUX; "
            "use FlowMatchEulerDiscreteScheduler"
        )
    t, vae = cfg["transformer"], cfg["vae"]
    if t.in_channels != 4 * vae.latent_channels:
        raise RelaxlmError(
            f"{path}/transformer: in_channels {t.in_channels} must be 4 x the VAE's "
            f"latent_channels ({vae.latent_channels}): 2x2 latent patches"
        )
    if t.joint_attention_dim != cfg["text_encoder_2"].d_model:
        raise RelaxlmError(
            f"{path}/transformer: joint_attention_dim {t.joint_attention_dim} differs from "
            f"the T5 encoder's d_model {cfg['text_encoder_2'].d_model}"
        )
    return FluxCheckpoint(
        path,
        index,
        cfg["text_encoder"],
        cfg["text_encoder_2"],
        t,
        vae,
        scheduler,
        max_sequence_length,
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
    ckpt: DiffusionCheckpoint | FluxCheckpoint,
    height: int,
    width: int,
    dtype: str = "float32",
    batch: str = "batch",
) -> list[Component]:
    """The entry functions with their input specs and weights in `dtype` (float32, float16
    or bfloat16; timesteps stay float32), for images of `height` x `width` pixels."""
    if isinstance(ckpt, FluxCheckpoint):
        return _flux_components(ckpt, height, width, dtype, batch)
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


def _flux_components(
    ckpt: FluxCheckpoint, height: int, width: int, dtype: str, batch: str
) -> list[Component]:
    f = 2 * ckpt.vae.scale_factor  # the VAE's scale, then 2x2 patches
    if height % f or width % f:
        raise RelaxlmError(
            f"image size {width}x{height} must be a multiple of {f} in each side (FLUX packs "
            "2x2 latent patches)"
        )
    image_tokens = (height // f) * (width // f)
    seq, seq_2 = ckpt.text.max_position_embeddings, ckpt.max_sequence_length
    t = ckpt.transformer
    modules = {
        "encode_text": CLIPTextModel(ckpt.text),
        "encode_text_2": T5EncoderModel(ckpt.text_2),
        "denoise": FluxTransformer2DModel(t),
        "decode_latents": AutoencoderKLDecoder(ckpt.vae),
    }
    for module in modules.values():
        module.to(dtype)
    lh, lw = height // ckpt.vae.scale_factor, width // ckpt.vae.scale_factor
    specs = {
        "encode_text": {"input_ids": nn.spec.Tensor([batch, seq], "int32")},
        "encode_text_2": {"input_ids": nn.spec.Tensor([batch, seq_2], "int32")},
        "denoise": {
            "hidden_states": nn.spec.Tensor([batch, image_tokens, t.in_channels], dtype),
            "context": nn.spec.Tensor([batch, seq_2, t.joint_attention_dim], dtype),
            "pooled": nn.spec.Tensor([batch, t.pooled_projection_dim], dtype),
            "timestep": nn.spec.Tensor([batch], "float32"),
            "guidance": nn.spec.Tensor([batch], "float32"),
            "rope_cos": nn.spec.Tensor([seq_2 + image_tokens, t.attention_head_dim], "float32"),
            "rope_sin": nn.spec.Tensor([seq_2 + image_tokens, t.attention_head_dim], "float32"),
        },
        "decode_latents": {
            "latents": nn.spec.Tensor([batch, ckpt.vae.latent_channels, lh, lw], dtype)
        },
    }
    folders = {
        "encode_text": "text_encoder",
        "encode_text_2": "text_encoder_2",
        "denoise": "transformer",
        "decode_latents": "vae",
    }
    return [
        Component(name, module, specs[name], _load(module, ckpt.path / folders[name], dtype))
        for name, module in modules.items()
    ]


def export_component(comp: Component):
    """(IRModule with one function named after the component, [(param name, nn.Parameter)])."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    return comp.module.export_tvm(spec={"forward": {**comp.spec, "$": modes}})

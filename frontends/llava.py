"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a 2-layer MLP projector and
a Llama / Mistral / Qwen2 text trunk (frontends/llama.py, unchanged).

Module tree and parameter names follow the checkpoint transformers 5 saves:
`vision_tower.{embeddings,pre_layrnorm,encoder.layers.N}`, `multi_modal_projector.linear_{1,2}`,
`language_model.{model,lm_head}`; the hub's llava-hf checkpoints (transformers 4) nest the tower
one level deeper, `vision_tower.vision_model.*`, and get that tree. Only the vision layers up to
`vision_feature_layer` are built (LLaVA reads the second-to-last by default), so the last layer
and `post_layernorm` go unused.

The vision encoder attends bidirectionally: every patch sees every other, written as plain
graph ops (matmul, softmax, no mask), since images never touch the KV cache. The patch
embedding (a stride-p convolution without bias) is a reshape and one matmul over the
checkpoint's [hidden, 3, p, p] weight.

Entry functions (frontends/entry.py, `export_vision_lm`): `encode_images` (pixels -> image
features in the text trunk's width), `embed_tokens` and `prefill_embeds`, besides the text
`prefill` / `decode`. The runtime splices the features in at the image-token positions.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .clip import CLIPEncoderLayer
from .config import activation, from_config
from .entry import TrunkVisionLM
from .llama import LlamaConfig, LlamaForCausalLM, qwen2_config

# Text trunks LLaVA checkpoints pair with CLIP: text_config.model_type -> config reader.
TEXT_MODELS = {
    "llama": LlamaConfig.from_dict,
    "mistral": LlamaConfig.from_dict,
    "qwen2": qwen2_config,
}
# transformers' config defaults, which hub checkpoints often leave out of a sub-config
# (llava-1.5's text_config names little more than its vocabulary).
_LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
_CLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
# CLIPImageProcessor's defaults (OpenAI CLIP statistics, bicubic), for a checkpoint without
# preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_BICUBIC = 3


@dataclass
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def tower_config(
    vision_config: dict[str, Any], defaults: dict[str, Any], model_type: str, family: str
) -> CLIPVisionConfig:
    """config.json's vision_config over the tower's `defaults`; RelaxlmError for a tower of
    another kind than `model_type` (CLIP for LLaVA, SigLIP for Gemma 3)."""
    raw = {**defaults, **vision_config}
    if raw.get("model_type", model_type) != model_type:
        raise RelaxlmError(
            f"config.json: vision_config.model_type {raw['model_type']!r} is not supported for "
            f"{family} (supported: {model_type})"
        )
    return from_config(CLIPVisionConfig, raw)


def check_image_token(index: int, vocab_size: int) -> None:
    """RelaxlmError for an image token id outside the trunk's vocabulary."""
    if not 0 <= index < vocab_size:
        raise RelaxlmError(
            f"config.json: image_token_index {index} lies outside the vocabulary (size "
            f"{vocab_size})"
        )


@dataclass
class LlavaConfig:
    vision_config: dict[str, Any]
    text_config: dict[str, Any]
    image_token_index: int = 32000
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Derived, not config.json keys:
    vision: CLIPVisionConfig | None = None
    text: LlamaConfig | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LlavaConfig":
        config = from_config(
            cls, raw, image_token_index=raw.get("image_token_index", raw.get("image_token_id"))
        )
        config.vision = tower_config(
            config.vision_config, _CLIP_DEFAULTS, "clip_vision_model", "LLaVA"
        )
        text_type = config.text_config.get("model_type", "llama")
        if text_type not in TEXT_MODELS:
            raise RelaxlmError(
                f"config.json: text_config.model_type {text_type!r} is not supported for LLaVA "
                f"(supported: {', '.join(TEXT_MODELS)})"
            )
        config.text = TEXT_MODELS[text_type]({**_LLAMA_DEFAULTS, **config.text_config})
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise RelaxlmError(
                "config.json: vision_feature_select_strategy "
                f"{config.vision_feature_select_strategy!r} is not one of 'default', 'full'"
            )
        if config.vision.image_size % config.vision.patch_size:
            raise RelaxlmError(
                f"config.json: vision_config.image_size {config.vision.image_size} is not a "
                f"multiple of patch_size {config.vision.patch_size}"
            )
        _ = config.feature_layers  # raises for indices outside the tower
        check_image_token(config.image_token_index, config.text.vocab_size)
        return config

    @property
    def feature_layers(self) -> list[int]:
        """The vision hidden states LLaVA reads, as counts of encoder layers run (0: the
        embeddings after pre_layrnorm, as transformers' `hidden_states[0]`)."""
        wanted = self.vision_feature_layer
        wanted = [wanted] if isinstance(wanted, int) else list(wanted)
        total = self.vision.num_hidden_layers
        counts = [w if w >= 0 else total + 1 + w for w in wanted]
        if not wanted or any(not 0 <= c <= total for c in counts):
            raise RelaxlmError(
                f"config.json: vision_feature_layer {self.vision_feature_layer!r} is outside the "
                f"vision tower's {total} layers"
            )
        return counts

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the prompt holds per image: one per patch, plus the class token with
        the "full" strategy."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def context_window(self) -> int:
        return self.text.context_window


class CLIPPatchEmbedding(nn.Module):
    """The stride-p, bias-free convolution of CLIP, as one matmul over flattened patches."""

    def __init__(self, config: CLIPVisionConfig):
        c, p = config.num_channels, config.patch_size
        self.patch_size = p
        self.weight = nn.Parameter((config.hidden_size, c, p, p))

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        b, c, h, w = pixels.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = nn.op.reshape(pixels, (b, c, gh, p, gw, p))
        x = nn.op.permute_dims(x, [0, 2, 4, 1, 3, 5])  # [b, gh, gw, c, p, p]
        x = nn.op.reshape(x, (b, gh * gw, c * p * p))  # patches in row-major order, as conv
        weight = nn.op.reshape(self.weight, (self.weight.shape[0], c * p * p))  # [hidden, cpp]
        return nn.op.matmul(x, nn.op.permute_dims(weight))  # [b, patches, hidden]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        h = config.hidden_size
        self.class_embedding = nn.Parameter((h,))
        self.patch_embedding = CLIPPatchEmbedding(config)
        self.position_embedding = nn.Embedding(config.num_patches + 1, h)

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        patches = self.patch_embedding(pixels.astype(self.class_embedding.dtype))
        b, n, h = patches.shape
        cls = nn.op.broadcast_to(nn.op.reshape(self.class_embedding, (1, 1, h)), (b, 1, h))
        x = nn.op.concat([cls, patches], dim=1)  # [b, 1 + patches, hidden]
        # Positions are 0 .. num_patches for every image: the whole table, in order.
        return x + nn.op.reshape(self.position_embedding.weight, (1, n + 1, h))


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, s, h = x.shape
        heads = (b, s, self.num_heads, self.head_dim)
        q = nn.op.permute_dims(nn.op.reshape(self.q_proj(x), heads), [0, 2, 1, 3])  # [b, H, s, d]
        k = nn.op.permute_dims(nn.op.reshape(self.k_proj(x), heads), [0, 2, 3, 1])  # [b, H, d, s]
        v = nn.op.permute_dims(nn.op.reshape(self.v_proj(x), heads), [0, 2, 1, 3])  # [b, H, s, d]
        scores = nn.op.matmul(q, k).astype("float32") * (1.0 / math.sqrt(self.head_dim))
        # Bidirectional: no mask, every patch attends to every patch and the class token.
        probs = nn.op.softmax(scores, axis=-1).astype(x.dtype)  # [b, H, s, s]
        out = nn.op.permute_dims(nn.op.matmul(probs, v), [0, 2, 1, 3])  # [b, s, H, d]
        return self.out_proj(nn.op.reshape(out, (b, s, h)))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig, num_layers: int):
        self.layers = nn.ModuleList(
            [
                CLIPEncoderLayer(config, CLIPAttention(config), "vision_config.hidden_act")
                for _ in range(num_layers)
            ]
        )


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer up to the deepest layer LLaVA reads."""

    def __init__(self, config: CLIPVisionConfig, feature_layers: list[int]):
        self.feature_layers = feature_layers
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, max(feature_layers))

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        """[b, 3, H, W] -> the selected hidden states, concatenated: [b, 1 + patches, k * h]."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        selected = [states[i] for i in self.feature_layers]
        return selected[0] if len(selected) == 1 else nn.op.concat(selected, dim=-1)


class CLIPVisionModel(nn.Module):
    """The tower under `vision_model`, as transformers 4 saved it (the hub's llava-hf
    checkpoints: `vision_tower.vision_model.encoder.layers.N...`)."""

    def __init__(self, config: CLIPVisionConfig, feature_layers: list[int]):
        self.vision_model = CLIPVisionTower(config, feature_layers)

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        return self.vision_model(pixels)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: LlavaConfig):
        width = config.vision.hidden_size * len(config.feature_layers)
        h, bias = config.text.hidden_size, config.multimodal_projector_bias
        self.linear_1 = nn.Linear(width, h, bias=bias)
        self.linear_2 = nn.Linear(h, h, bias=bias)
        self.act = activation("projector_hidden_act", config.projector_hidden_act)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def pixel_settings(p: dict[str, Any], resample: int, mean, std) -> dict[str, Any]:
    """An image processor's resampling, RGB conversion, rescale and normalization, from its
    preprocessor_config.json `p` (defaults: the given filter, 1/255, `mean` and `std`)."""
    rescale, normalize = p.get("do_rescale", True), p.get("do_normalize", True)
    return {
        "resample": int(p.get("resample", resample)),
        "do_convert_rgb": bool(p.get("do_convert_rgb", True)),
        "rescale_factor": float(p.get("rescale_factor", 1 / 255)) if rescale else 1.0,
        "image_mean": list(p.get("image_mean", mean)) if normalize else [0.0] * 3,
        "image_std": list(p.get("image_std", std)) if normalize else [1.0] * 3,
    }


class LlavaForConditionalGeneration(TrunkVisionLM):
    def __init__(self, config: LlavaConfig, nested_tower: bool = False):
        self.config = config
        tower = CLIPVisionModel if nested_tower else CLIPVisionTower
        self.vision_tower = tower(config.vision, config.feature_layers)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config.text)

    def embed_tokens(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.language_model.model.embed_tokens(input_ids).astype("float32")

    def encode_images(self, pixel_values: nn.Tensor) -> nn.Tensor:
        features = self.vision_tower(pixel_values)  # [b, 1 + patches, k * vision hidden]
        if self.config.vision_feature_select_strategy == "default":  # drop the class token
            features = nn.op.split(features, [1], axis=1)[1]  # [b, patches, k * vision hidden]
        return self.multi_modal_projector(features).astype("float32")

    def vision_manifest(self, preprocessor: dict[str, Any] | None) -> dict[str, Any]:
        """What the runtime needs to turn an image into `encode_images` input and a prompt:
        the CLIPImageProcessor settings (from preprocessor_config.json, else CLIP's defaults)
        and the image token."""
        v, p = self.config.vision, preprocessor or {}
        size = p.get("size", {"shortest_edge": v.image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = p.get("crop_size", {"height": v.image_size, "width": v.image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if not p.get("do_center_crop", True):  # resized straight to the tower's input
            crop = {"height": v.image_size, "width": v.image_size}
            size = {"height": v.image_size, "width": v.image_size}
        if (crop.get("height"), crop.get("width")) != (v.image_size, v.image_size):
            raise RelaxlmError(
                f"preprocessor_config.json: crop_size {crop} differs from the vision tower's "
                f"image_size {v.image_size}"
            )
        return {
            "processor": "clip",
            "size": size,
            "crop_size": crop,
            **pixel_settings(p, PIL_BICUBIC, CLIP_MEAN, CLIP_STD),
            "image_shape": list(self.image_shape),
            "image_token_id": self.config.image_token_index,
            "tokens_per_image": self.config.tokens_per_image,
            "hidden_size": self.hidden_size,
        }

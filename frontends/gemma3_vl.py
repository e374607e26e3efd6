"""Gemma 3 vision-language (`Gemma3ForConditionalGeneration`): a SigLIP vision tower, an
average-pooling projector and the Gemma 3 text trunk (frontends/gemma3.py, unchanged).

- SigLIP is CLIP's tower (frontends/llava.py) without the class token and pre-norm, with a
  bias on the patch convolution, gelu-tanh MLPs and a `post_layernorm`; Gemma 3 reads its last
  hidden state.
- The projector lays the patches out as their [side, side] grid, average-pools it to
  `mm_tokens_per_image` tokens, applies Gemma's RMSNorm (1 + w) and one matmul into the text
  width. The features replace the image soft tokens' embeddings as they are: unlike the text
  embeddings they are not scaled by sqrt(hidden_size).
- Image tokens attend bidirectionally within their image's block (and causally to all before
  it). The trunk runs each block as a forward of its own through the `prefill_image_block`
  entry, whose attention calls are marked bidirectional (compiler/lower_attention_to_paged_kv.py
  says how the paged KV cache computes them); text prefills and decodes as usual.

Module tree and parameter names follow the checkpoint: `vision_tower[.vision_model]`,
`multi_modal_projector.{mm_input_projection_weight,mm_soft_emb_norm}`, `language_model.model`.
Pan-and-scan crops (off by default in transformers) are not supported.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import from_config
from .entry import TrunkVisionLM
from .gemma2 import GemmaRMSNorm
from .gemma3 import Gemma3Config, Gemma3ForCausalLM
from .llava import (
    CLIPEncoder,
    CLIPPatchEmbedding,
    CLIPVisionConfig,
    check_image_token,
    pixel_settings,
    tower_config,
)

# transformers' SiglipVisionConfig defaults, for a checkpoint that leaves keys out.
_SIGLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
# Gemma3ImageProcessor's defaults: bilinear resize to the tower's square, mean = std = 0.5.
_GEMMA3_MEAN = [0.5, 0.5, 0.5]
_GEMMA3_STD = [0.5, 0.5, 0.5]
PIL_BILINEAR = 2


@dataclass
class Gemma3VLConfig:
    vision_config: dict[str, Any]
    text_config: dict[str, Any]
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255999
    eoi_token_index: int = 256000
    image_token_index: int = 262144
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Derived, not config.json keys:
    vision: CLIPVisionConfig | None = None
    text: Gemma3Config | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Gemma3VLConfig":
        config = from_config(
            cls, raw, image_token_index=raw.get("image_token_index", raw.get("image_token_id"))
        )
        config.vision = tower_config(
            config.vision_config, _SIGLIP_DEFAULTS, "siglip_vision_model", "Gemma 3"
        )
        config.text = Gemma3Config.from_dict(config.text_config)
        config.check()
        return config

    def check(self) -> None:
        """RelaxlmError for a config whose image tokens relaxlm cannot lay out."""
        v = self.vision
        side = v.image_size // v.patch_size
        pooled = math.isqrt(self.mm_tokens_per_image)
        if v.image_size % v.patch_size or pooled**2 != self.mm_tokens_per_image or side % pooled:
            raise RelaxlmError(
                f"config.json: mm_tokens_per_image {self.mm_tokens_per_image} must be a square "
                f"whose side divides the vision tower's {side}x{side} patches (image_size "
                f"{v.image_size} / patch_size {v.patch_size})"
            )
        windows = [w for w in self.text.layer_windows if w]
        if self.mm_tokens_per_image < 2 or any(w < self.mm_tokens_per_image for w in windows):
            raise RelaxlmError(
                f"config.json: mm_tokens_per_image {self.mm_tokens_per_image} must be at least 2 "
                f"and at most the sliding window {min(windows, default=0)}: relaxlm attends an "
                "image's tokens to each other in one forward"
            )
        check_image_token(self.image_token_index, self.text.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def context_window(self) -> int:
        return self.text.context_window


class SiglipPatchEmbedding(CLIPPatchEmbedding):
    """CLIP's patch convolution with a bias."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.bias = nn.Parameter((config.hidden_size,))

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        return super().forward(pixels) + self.bias


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        self.patch_embedding = SiglipPatchEmbedding(config)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        patches = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))
        _, n, h = patches.shape
        # Positions are 0 .. num_patches - 1 for every image: the whole table, in order.
        return patches + nn.op.reshape(self.position_embedding.weight, (1, n, h))


class SiglipVisionTower(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = CLIPEncoder(config, config.num_hidden_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        """[b, 3, H, W] -> the last hidden state, [b, patches, vision hidden]."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """The tower under `vision_model`, as transformers 4 saved it."""

    def __init__(self, config: CLIPVisionConfig):
        self.vision_model = SiglipVisionTower(config)

    def forward(self, pixels: nn.Tensor) -> nn.Tensor:
        return self.vision_model(pixels)


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, config: Gemma3VLConfig):
        v = config.vision
        self.side = v.image_size // v.patch_size
        self.pooled = math.isqrt(config.mm_tokens_per_image)
        self.mm_input_projection_weight = nn.Parameter((v.hidden_size, config.text.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(v.hidden_size, v.layer_norm_eps)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, _, h = x.shape
        t, k = self.pooled, self.side // self.pooled
        # Patches are row-major over the grid: [b, t, k, t, k, h] puts each pooling window
        # on axes 2 and 4.
        x = nn.op.reshape(x, (b, t, k, t, k, h))
        x = nn.op.sum(x, axis=[2, 4]) * (1.0 / (k * k))  # [b, t, t, h], as AvgPool2d(k, k)
        x = self.mm_soft_emb_norm(nn.op.reshape(x, (b, t * t, h)))
        return nn.op.matmul(x, self.mm_input_projection_weight)  # [b, tokens, text hidden]


class Gemma3ForConditionalGeneration(TrunkVisionLM):
    def __init__(self, config: Gemma3VLConfig, nested_tower: bool = False):
        self.config = config
        tower = SiglipVisionModel if nested_tower else SiglipVisionTower
        self.vision_tower = tower(config.vision)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)
        self.language_model = Gemma3ForCausalLM(config.text)

    def embed_tokens(self, input_ids: nn.Tensor) -> nn.Tensor:
        # Scaled by sqrt(hidden_size), as the trunk's own embedding; image features are not.
        return self.language_model.model.embed(input_ids).astype("float32")

    def prefill_image_block(self, embeddings: nn.Tensor, logit_positions: nn.Tensor) -> nn.Tensor:
        """prefill_embeds over one image's block of tokens, which attend to each other
        bidirectionally."""
        with self._bidirectional_attention():
            return self.prefill_embeds(embeddings, logit_positions)

    @contextlib.contextmanager
    def _bidirectional_attention(self):
        """The trunk's attention calls marked bidirectional while an entry is traced."""
        layers = [layer.self_attn for layer in self.language_model.model.layers]
        for m in layers:
            m.bidirectional = True
        try:
            yield
        finally:
            for m in layers:
                m.bidirectional = False

    def encode_images(self, pixel_values: nn.Tensor) -> nn.Tensor:
        features = self.vision_tower(pixel_values)  # [b, patches, vision hidden]
        return self.multi_modal_projector(features).astype("float32")

    def vision_manifest(self, preprocessor: dict[str, Any] | None) -> dict[str, Any]:
        """Gemma3ImageProcessor's settings (from preprocessor_config.json, else its defaults)
        and the image tokens: `<start_of_image>` in a prompt becomes boi, the soft tokens, eoi."""
        v, p = self.config.vision, preprocessor or {}
        if p.get("do_pan_and_scan"):
            raise RelaxlmError(
                "preprocessor_config.json: do_pan_and_scan is not supported; set it to false"
            )
        side = {"height": v.image_size, "width": v.image_size}
        size = p.get("size", side)
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if (size.get("height"), size.get("width")) != (v.image_size, v.image_size):
            raise RelaxlmError(
                f"preprocessor_config.json: size {size} differs from the vision tower's "
                f"image_size {v.image_size}"
            )
        return {
            "processor": "gemma3",
            "size": side,
            "crop_size": side,
            **pixel_settings(p, PIL_BILINEAR, _GEMMA3_MEAN, _GEMMA3_STD),
            "image_shape": list(self.image_shape),
            "image_token_id": self.config.image_token_index,
            "boi_token_id": self.config.boi_token_index,
            "eoi_token_id": self.config.eoi_token_index,
            "tokens_per_image": self.config.mm_tokens_per_image,
            "hidden_size": self.hidden_size,
            "bidirectional_image_blocks": True,
        }

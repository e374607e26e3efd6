"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): LLaVA-1.5 (frontends/llava.py)
plus "anyres" tiling and one learned vector, `image_newline`.

An image becomes several tower inputs: the image resized to the tower's square (the base
image) and the tiles of the image resized and padded to its best `image_grid_pinpoints`
resolution. The graph stays LLaVA-1.5's: `encode_images` runs the tower and projector over a
batch of tiles, one static shape per tile. The packing that follows — the tiles' patch features
laid out as one grid, the padding rows or columns cut away, `image_newline` after each row,
the base image's features first — depends on the image's size only, so the runtime does it in
numpy (runtime/vision.py, `AnyresLayout`), from the manifest and the `image_newline_features`
entry. The number of image tokens therefore varies with the image's size.

Only `vision_feature_select_strategy="default"` works with a CLIP tower: with "full" the class
token does not fit transformers' grid of patch features, and transformers fails too.
"""

from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .llava import LlavaConfig, LlavaForConditionalGeneration

# transformers' default for a config without image_grid_pinpoints: LLaVA-1.6's, for 336-pixel
# CLIP tiles.
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass
class LlavaNextConfig(LlavaConfig):
    image_grid_pinpoints: list[list[int]] | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LlavaNextConfig":
        config = super().from_dict(raw)
        if config.image_grid_pinpoints is None:
            config.image_grid_pinpoints = DEFAULT_PINPOINTS
        config.image_grid_pinpoints = check_pinpoints(
            config.image_grid_pinpoints, config.vision.image_size, "config.json"
        )
        if config.vision_feature_select_strategy != "default":
            raise RelaxlmError(
                "config.json: vision_feature_select_strategy "
                f"{config.vision_feature_select_strategy!r} does not fit LLaVA-NeXT's grid of "
                "patch features with a CLIP tower (the class token has no place in it); use "
                "'default'"
            )
        return config


def check_pinpoints(pinpoints: Any, tile: int, where: str) -> list[list[int]]:
    """image_grid_pinpoints as [[height, width], ...], each a positive multiple of the tile."""
    ok = isinstance(pinpoints, list) and pinpoints
    pairs = [list(p) for p in pinpoints] if ok else []
    if not ok or any(
        len(p) != 2 or any(not isinstance(v, int) or v <= 0 or v % tile for v in p) for p in pairs
    ):
        raise RelaxlmError(
            f"{where}: image_grid_pinpoints {pinpoints!r} must be a list of [height, width] "
            f"pairs, each a positive multiple of the vision tower's image_size {tile}"
        )
    return pairs


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config: LlavaNextConfig, nested_tower: bool = False):
        super().__init__(config, nested_tower)
        self.image_newline = nn.Parameter((config.text.hidden_size,))

    def image_newline_features(self) -> nn.Tensor:
        """The vector after each row of an image's tile grid, [hidden] float32."""
        return self.image_newline.astype("float32")

    def vision_manifest(self, preprocessor: dict[str, Any] | None) -> dict[str, Any]:
        """LLaVA-1.5's entry, with the tiling: the pinpoints (the processor's, which equal the
        model's in every checkpoint; refused where they differ) and the patch grid per tile."""
        vision = super().vision_manifest(preprocessor)
        pinpoints = self.config.image_grid_pinpoints
        theirs = (preprocessor or {}).get("image_grid_pinpoints")
        if theirs is not None:
            theirs = check_pinpoints(theirs, self.config.vision.image_size, "preprocessor_config")
            if theirs != pinpoints:
                raise RelaxlmError(
                    f"preprocessor_config.json: image_grid_pinpoints {theirs} differ from "
                    f"config.json's {pinpoints}; make them equal"
                )
        v = self.config.vision
        # encode_images' rows per tile; an image's token count comes from its size.
        tokens_per_tile = vision.pop("tokens_per_image")
        return {
            **vision,
            "processor": "llava_next",
            "image_grid_pinpoints": pinpoints,
            "patches_per_side": v.image_size // v.patch_size,
            "tokens_per_tile": tokens_per_tile,
        }

"""Images in: loading, preprocessing equal to the checkpoint's CLIPImageProcessor, and the
image features spliced into a prompt's embeddings.

Everything comes from the manifest's `vision` entry (written by the frontend), so the runtime
never reads the checkpoint. Imports Pillow (the `vision` extra) and numpy, no compiler code.
"""

import base64
import binascii
import contextlib
import hashlib
import io
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from relaxlm.errors import RelaxlmError

# Limits on one image: the encoded bytes, and the decoded pixels (a small PNG can decode to
# gigabytes; Pillow's own bomb check only warns below twice its limit).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
URL_TIMEOUT_S = 10.0


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - the vision extra is missing
        raise RelaxlmError(
            "images need Pillow: pip install 'relaxlm[vision]' (or pip install pillow)"
        ) from e
    return Image


def load_image(source: Any, *, max_bytes: int = MAX_IMAGE_BYTES, timeout: float = URL_TIMEOUT_S):
    """A PIL image from a file path, bytes, a PIL image, a `data:` URL or an http(s) URL.

    The whole image is decoded here, so a corrupt file fails now with a RelaxlmError naming it,
    not later in preprocessing.
    """
    Image = _pil()
    if isinstance(source, Image.Image):
        return _checked(source, "the image")
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode(bytes(source), "the image bytes", max_bytes)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise RelaxlmError(
            f"an image must be a file path, bytes, a PIL image or a data:/http(s) URL, not "
            f"{type(source).__name__}"
        )
    if source.startswith("data:"):
        return _decode(_data_url(source), "the data: URL", max_bytes)
    if source.startswith(("http://", "https://")):
        return _decode(_fetch(source, max_bytes, timeout), source, max_bytes)
    path = Path(source)
    if not path.is_file():
        raise RelaxlmError(f"image {source[:100]!r} is not a file, a data: URL or an http(s) URL")
    if path.stat().st_size > max_bytes:
        raise RelaxlmError(
            f"image {path} is {path.stat().st_size} bytes; the limit is {max_bytes} bytes"
        )
    return _decode(path.read_bytes(), str(path), max_bytes)


def _data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RelaxlmError(
            "an image data: URL must be base64, e.g. data:image/png;base64,iVBORw0KGgo..."
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RelaxlmError(f"the image data: URL is not valid base64 ({e})") from e


def _fetch(url: str, max_bytes: int, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RelaxlmError(
            f"could not fetch image {url} ({e}); download it and pass the file or a data: URL"
        ) from e
    if len(data) > max_bytes:
        raise RelaxlmError(f"image {url} is over the limit of {max_bytes} bytes")
    return data


def _decode(data: bytes, what: str, max_bytes: int):
    Image = _pil()
    if len(data) > max_bytes:
        raise RelaxlmError(f"{what} is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
        _checked(image, what)
        image.load()
    except RelaxlmError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RelaxlmError(f"{what} is not a readable image ({e})") from e
    return image


def _checked(image, what: str):
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
        raise RelaxlmError(
            f"{what} is {w}x{h} pixels; images must have between 1 and {MAX_IMAGE_PIXELS} pixels"
        )
    return image


@dataclass(frozen=True)
class ImageProcessor:
    """CLIPImageProcessor's steps in numpy and Pillow: RGB (alpha composited on white),
    shortest-edge resize with the checkpoint's filter, center crop, rescale, normalize."""

    size: dict[str, int]
    crop_size: dict[str, int]
    resample: int
    do_convert_rgb: bool
    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @classmethod
    def from_manifest(cls, vision: dict[str, Any]) -> "ImageProcessor":
        return cls(
            size=dict(vision["size"]),
            crop_size=dict(vision["crop_size"]),
            resample=int(vision["resample"]),
            do_convert_rgb=bool(vision["do_convert_rgb"]),
            rescale_factor=float(vision["rescale_factor"]),
            image_mean=tuple(vision["image_mean"]),
            image_std=tuple(vision["image_std"]),
        )

    def __call__(self, image) -> np.ndarray:
        """One PIL image -> pixel values [3, crop height, crop width] float32."""
        return self.pixels(self.rgb(image))

    def rgb(self, image):
        return _to_rgb(image) if self.do_convert_rgb else image

    def pixels(self, image) -> np.ndarray:
        """The steps after RGB conversion: resize, crop, rescale, normalize."""
        height, width = self._resized_shape(image.height, image.width)
        image = image.resize((width, height), resample=self.resample, reducing_gap=None)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        # As transformers: rescale in float64, then float32; normalize in float32.
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # [h, w, c] -> [c, h, w]

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            edge = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)  # truncated, as transformers does
            return (new_long, edge) if width <= height else (edge, new_long)
        return self.size["height"], self.size["width"]


@dataclass(frozen=True)
class ImageTiles:
    """One image as encode_images takes it: [tiles, 3, h, w] pixel values (one tile for
    LLaVA-1.5; the base image, then the grid's tiles row by row, for LLaVA-NeXT), and the
    image's (height, width), which fixes how LLaVA-NeXT lays out their features."""

    pixels: np.ndarray
    size: tuple[int, int]


@dataclass(frozen=True)
class AnyresLayout:
    """LLaVA-NeXT's "anyres" tiling, as transformers' LlavaNextImageProcessor and
    LlavaNextForConditionalGeneration do it: the image resized into its best grid resolution
    and padded to it, cut into tower-sized tiles; their patch features laid out as one grid,
    the padding's rows (or columns) cut away, `image_newline` after each row, and the base
    image's features in front."""

    pinpoints: tuple[tuple[int, int], ...]  # (height, width), multiples of tile
    tile: int  # the tower's image size
    patches: int  # patches per tile side

    @classmethod
    def from_manifest(cls, vision: dict[str, Any]) -> "AnyresLayout":
        return cls(
            pinpoints=tuple((int(h), int(w)) for h, w in vision["image_grid_pinpoints"]),
            tile=int(vision["image_shape"][1]),
            patches=int(vision["patches_per_side"]),
        )

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The pinpoint that keeps the most of the image's pixels, then wastes the fewest."""
        best, most, least = self.pinpoints[0], 0, float("inf")
        for h, w in self.pinpoints:
            scale = min(w / width, h / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            wasted = w * h - kept
            if kept > most or (kept == most and wasted < least):
                best, most, least = (h, w), kept, wasted
        return best

    def tiles(self, processor: ImageProcessor, image) -> ImageTiles:
        """An RGB PIL image -> its base image and tiles, each through `processor.pixels`."""
        Image = _pil()
        height, width = image.height, image.width
        best_h, best_w = self.best_resolution(height, width)
        # Fit inside the resolution keeping the aspect ratio (rounded up), then center it.
        if best_w / width < best_h / height:
            new_h, new_w = min(math.ceil(height * best_w / width), best_h), best_w
        else:
            new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
        resized = np.asarray(
            image.resize((new_w, new_h), resample=processor.resample, reducing_gap=None)
        )
        if resized.ndim == 2:
            resized = resized[:, :, None]
        canvas = np.zeros((best_h, best_w, resized.shape[2]), dtype=resized.dtype)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = resized
        size = processor.size
        base_h, base_w = (
            (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        )
        base = image.resize((base_w, base_h), resample=processor.resample, reducing_gap=None)
        if canvas.shape[2] == 1:  # grayscale kept as such (do_convert_rgb off)
            canvas = canvas[:, :, 0]
        parts = [base] + [
            Image.fromarray(canvas[i : i + self.tile, j : j + self.tile])
            for i in range(0, best_h, self.tile)
            for j in range(0, best_w, self.tile)
        ]
        return ImageTiles(np.stack([processor.pixels(p) for p in parts]), (height, width))

    def grid(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The feature grid an image keeps: (first row, rows, first column, columns) of the
        full grid of its tiles' patches, the padding's rows or columns cut away."""
        best_h, best_w = self.best_resolution(height, width)
        rows, cols = best_h // self.tile * self.patches, best_w // self.tile * self.patches
        if width / height > cols / rows:  # padded above and below
            pad = (rows - int(round(height * (cols / width), 7))) // 2
            return pad, rows - 2 * pad, 0, cols
        pad = (cols - int(round(width * (rows / height), 7))) // 2
        return 0, rows, pad, cols - 2 * pad

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens for an image of this size: the base image's patches, then each kept
        row of the grid and its newline."""
        _, rows, _, cols = self.grid(height, width)
        return self.patches**2 + rows * (cols + 1)

    def pack(self, features: np.ndarray, newline: np.ndarray, size: tuple[int, int]):
        """[1 + tiles, patches^2, hidden] features of one image -> [num_tokens, hidden]."""
        height, width = size
        best_h, best_w = self.best_resolution(height, width)
        th, tw, p = best_h // self.tile, best_w // self.tile, self.patches
        hidden = features.shape[-1]
        grid = features[1:].reshape(th, tw, p, p, hidden).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(th * p, tw * p, hidden)  # [rows, cols, hidden], row-major patches
        top, rows, left, cols = self.grid(height, width)
        grid = grid[top : top + rows, left : left + cols]
        ends = np.broadcast_to(newline.astype(grid.dtype), (rows, 1, hidden))
        packed = np.concatenate([grid, ends], axis=1).reshape(-1, hidden)
        return np.concatenate([features[0], packed])


def _each(counts: list[int]) -> str:
    """Images' token counts for a message: "16 each", or "88 + 40"."""
    if len(set(counts)) == 1:
        return f"{counts[0]} each"
    return " + ".join(map(str, counts))


def _to_rgb(image):
    Image = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, c] cropped (or zero-padded where smaller) to [height, width, c] about the center."""
    h, w, c = pixels.shape
    if h < height or w < width:  # pad first, centered, as transformers does
        padded = np.zeros((max(h, height), max(w, width), c), dtype=pixels.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top : top + h, left : left + w] = pixels
        pixels, (h, w) = padded, padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


@dataclass(frozen=True)
class ImagePrompt:
    """A prompt with images, as the engine schedules it: token ids where each image token is
    an id past the vocabulary that `rows` maps to its image feature row."""

    token_ids: list[int]
    rows: dict[int, np.ndarray]
    image_token_id: int
    # M-RoPE models (Qwen2.5-VL, runtime/vision_qwen.py): the prompt's shifted positions
    # [3, n], and the prefix-cache key of that shift (0: unshifted, shared with text prompts).
    positions: np.ndarray | None = None
    cache_key: int = 0

    @property
    def text_ids(self) -> list[int]:
        """The token ids with the model's image token at every image position."""
        return [self.image_token_id if t in self.rows else t for t in self.token_ids]

    def __len__(self) -> int:
        return len(self.token_ids)


class ImageEncoder:
    """A vision-language artifact's image entries over a loaded CompiledModel: pixels ->
    features, and prompts (token ids with image tokens) -> embeddings with features spliced in.

    LLaVA-1.5 gives every image `tokens_per_image` tokens; LLaVA-NeXT (`layout` set) a number
    that depends on the image's size, so the prompt's image tokens are expanded per image.
    """

    mrope = False  # prefill takes no positions (see runtime/vision_qwen.py)

    def __init__(self, model):
        vision = model.manifest.vision
        if not vision:
            raise RelaxlmError(
                f"{model.folder} ({model.manifest.architecture}) is a text-only model: it takes "
                "no images; use a vision-language model (e.g. LlavaForConditionalGeneration)"
            )
        self.model = model
        self.processor = ImageProcessor.from_manifest(vision)
        self.image_token_id = int(vision["image_token_id"])
        self.hidden_size = int(vision["hidden_size"])
        anyres = vision.get("processor") == "llava_next"
        self.layout = AnyresLayout.from_manifest(vision) if anyres else None
        # Per image for LLaVA-1.5; per tile for LLaVA-NeXT, whose images vary.
        self.tokens_per_image = None if anyres else int(vision["tokens_per_image"])
        self._encode = model.vm["encode_images"]
        self._embed = model.vm["embed_tokens"]
        self._prefill = model.vm["prefill_embeds"]
        self._newline = model.vm["image_newline_features"](model.params).numpy() if anyres else None
        # Gemma 3: each image's tokens attend to each other, in a forward of their own.
        blocks = vision.get("bidirectional_image_blocks", False)
        self._prefill_block = model.vm["prefill_image_block"] if blocks else None
        # sequence -> its image tokens the last chunk ended with, short of the image's end
        self._partial: dict[int, int] = {}
        # Gemma 3: a prompt marks an image with `<start_of_image>` (see expand_text).
        self.boi_token_id = vision.get("boi_token_id")
        self.eoi_token_id = vision.get("eoi_token_id")

    @property
    def placeholder_ids(self) -> list[int]:
        """What a prompt holds per image before expansion: the image token (Gemma 3: its
        `<start_of_image>`)."""
        return [self.image_token_id if self.boi_token_id is None else self.boi_token_id]

    def expand_text(self, text: str, token_text) -> str:
        """A prompt's text with each image marker written out before tokenizing, as the
        checkpoint's processor does. Gemma 3: `<start_of_image>` becomes a blank line, itself,
        the image token (which `prompt` repeats per image), `<end_of_image>`, a blank line.
        token_text: token id -> its text in the tokenizer."""
        if self.boi_token_id is None:
            return text
        boi, image, eoi = map(
            token_text, (self.boi_token_id, self.image_token_id, self.eoi_token_id)
        )
        return text.replace(boi, f"\n\n{boi}{image}{eoi}\n\n")

    def pixel_values(self, images: list) -> np.ndarray:
        """Sources (see `load_image`) -> [k, 3, h, w] float32 (one tile per image: LLaVA-1.5;
        LLaVA-NeXT's images are `tiles`)."""
        return np.concatenate([self.tiles(image).pixels for image in images])

    def tiles(self, source) -> ImageTiles:
        """One source (see `load_image`) -> its encode_images input and size."""
        image = self.processor.rgb(load_image(source))
        if self.layout is not None:
            return self.layout.tiles(self.processor, image)
        return ImageTiles(self.processor.pixels(image)[None], (image.height, image.width))

    def num_tokens(self, image: ImageTiles) -> int:
        """The image tokens one image takes in a prompt."""
        if self.layout is not None:
            return self.layout.num_tokens(*image.size)
        return self.tokens_per_image

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """[k, 3, h, w] pixels (images or tiles) -> [k, tokens per tile, hidden] features."""
        x = tvm.runtime.tensor(
            np.ascontiguousarray(pixel_values, dtype=np.float32), self.model.device
        )
        return self._encode(x, self.model.params).numpy()

    def features(self, images: list[ImageTiles]) -> list[np.ndarray]:
        """Images -> each one's [num_tokens, hidden] features; the tower runs once over all
        their tiles."""
        out = self.encode(np.concatenate([image.pixels for image in images]))
        splits = np.cumsum([len(image.pixels) for image in images])[:-1]
        if self.layout is None:
            return [f[0] for f in np.split(out, splits)]
        return [
            self.layout.pack(f, self._newline, image.size)
            for f, image in zip(np.split(out, splits), images, strict=True)
        ]

    def expand(self, token_ids: list[int], counts: list[int] | None = None) -> list[int]:
        """Each image token repeated to its image's count (`counts`, in order; LLaVA-1.5:
        `tokens_per_image` each) — a prompt as its template wrote it, one `<image>` per image."""
        if counts is None:
            if self.tokens_per_image is None:
                raise RelaxlmError(
                    "LLaVA-NeXT's images take a number of tokens that depends on their size; "
                    "pass counts=[encoder.num_tokens(image) ...]"
                )
            counts = [self.tokens_per_image] * sum(t == self.image_token_id for t in token_ids)
        out: list[int] = []
        k = 0
        for t in token_ids:
            if t == self.image_token_id and k < len(counts):
                out.extend([t] * counts[k])
                k += 1
            else:
                out.append(t)
        return out

    def embeddings(self, token_ids: list[int], features) -> np.ndarray:
        """Expanded prompt ids and the images' features (a list of [n_i, hidden], or an array
        [k, n, hidden]) -> [n, hidden], the token embeddings with the images' features, in
        order, at the image-token positions."""
        ids = np.asarray(token_ids, dtype=np.int32)
        at = ids == self.image_token_id
        counts = [len(f) for f in features]
        if int(at.sum()) != sum(counts):
            raise RelaxlmError(
                f"the prompt has {int(at.sum())} image tokens but {len(features)} images need "
                f"{sum(counts)} ({_each(counts)}); put one image placeholder per image"
            )
        ids = np.where(at, 0, ids)  # the image token may lie past the table; its row is unused
        x = tvm.runtime.tensor(ids.reshape(1, -1), self.model.device)
        embeds = self._embed(x, self.model.params).numpy()[0]  # [n, hidden]
        if counts:
            embeds[at] = np.concatenate([np.reshape(f, (-1, self.hidden_size)) for f in features])
        return embeds

    def prompt(self, token_ids: list[int], images: list, lock=None) -> "ImagePrompt":
        """A prompt holding one image token per image (as a chat template writes it) and the
        images (sources for `load_image`) -> the engine's ImagePrompt.

        Each image's tokens get ids of their own past the vocabulary, drawn from a hash of its
        features: the scheduler's prefix cache, which keys on token ids, then reuses a
        prompt's KV pages only for the same image in the same place, never for another.
        lock: held while encode_images runs (the engine's: one thread at a time in the VM);
        loading and preprocessing happen before, outside it.
        """
        found = sum(t == self.image_token_id for t in token_ids)
        if found != len(images):
            raise RelaxlmError(
                f"the prompt has {found} image placeholders for {len(images)} images; put one "
                "per image (the chat template writes them for image content parts)"
            )
        tiles = [self.tiles(image) for image in images]
        counts = [self.num_tokens(t) for t in tiles]
        length = len(token_ids) - len(images) + sum(counts)
        window = self.model.context_window
        if length > window:
            raise RelaxlmError(
                f"{len(images)} images take {sum(counts)} tokens ({_each(counts)}); with the text "
                f"the prompt has {length}, more than the context window of {window}; send "
                "fewer or smaller images, or less text"
            )
        with lock or contextlib.nullcontext():
            features = self.features(tiles) if images else []
        # Images' id ranges are `window` apart, so no two images' ids overlap.
        vocab = self.model.vocab_size
        ids, rows, k = [], {}, 0
        for t in token_ids:
            if t != self.image_token_id:
                ids.append(t)
                continue
            digest = hashlib.sha256(features[k].tobytes()).digest()
            base = vocab + int.from_bytes(digest[:6], "little") * window
            ids += range(base, base + len(features[k]))
            rows.update(zip(range(base, base + len(features[k])), features[k], strict=True))
            k += 1
        return ImagePrompt(ids, rows, self.image_token_id)

    def prefill_tokens(
        self, seq_ids: list[int], chunks: list[list[int]], rows: dict[int, np.ndarray]
    ) -> np.ndarray:
        """As CompiledModel.prefill over token ids where ids in `rows` (an ImagePrompt's image
        ids) stand for their image features."""
        vocab = self.model.vocab_size
        if self._prefill_block is not None and any(t >= vocab for c in chunks for t in c):
            return np.stack(
                [self._prefill_blocks(s, c, rows) for s, c in zip(seq_ids, chunks, strict=True)]
            )
        for seq_id in seq_ids:
            self._partial.pop(seq_id, None)
        splits = np.cumsum([len(c) for c in chunks])[:-1]
        flat = np.fromiter((t for c in chunks for t in c), dtype=np.int64)
        return self.prefill_embeddings(seq_ids, np.split(self._embeddings(flat, rows), splits))

    def _embeddings(self, ids: np.ndarray, rows: dict[int, np.ndarray]) -> np.ndarray:
        """Token ids, image ids among them -> [n, hidden] embeddings with the image rows."""
        at = ids >= self.model.vocab_size
        x = np.where(at, 0, ids).astype(np.int32)  # their embedding rows are replaced
        embeds = self._embed(tvm.runtime.tensor(x[None], self.model.device), self.model.params)
        embeds = embeds.numpy()[0]  # [n, hidden]
        if at.any():
            embeds[at] = np.stack([rows[int(t)] for t in ids[at]])
        return embeds

    def _prefill_blocks(self, seq_id: int, chunk: list[int], rows) -> np.ndarray:
        """One sequence's chunk with image tokens, of a model whose images attend
        bidirectionally; the logits after its last token.

        The scheduler may cut a prompt inside an image. Then the image's first tokens, computed
        by themselves in the step before, never saw its last: they are popped from the cache
        and computed again with the rest, as one block. (An image's first tokens from another
        prompt's cached pages saw all of it; the rest attends them as context.)
        """
        vocab, window = self.model.vocab_size, self.model.context_window
        ids = np.asarray(chunk, dtype=np.int64)
        # ImagePrompt gives image k's tokens ids base_k + 0 .. n - 1, with base_k - vocab a
        # multiple of the context window: a token's place in its image is the remainder.
        head = self._partial.pop(seq_id, 0) if ids[0] >= vocab else 0
        if head:
            tvm.get_global_func("vm.builtin.kv_state_popn")(self.model.kv_cache, seq_id, head)
            ids = np.concatenate([np.arange(ids[0] - head, ids[0]), ids])
        if ids[-1] >= vocab and (ids[-1] - vocab) % window != self.tokens_per_image - 1:
            tail = 1  # the image's tokens at the chunk's end, to compute again next step
            while tail < len(ids) and vocab <= ids[-tail - 1] == ids[-tail] - 1:
                tail += 1
            self._partial[seq_id] = tail
        is_image = ids >= vocab
        return self.prefill_image_blocks(seq_id, self._embeddings(ids, rows), is_image)

    def prefill_image_blocks(self, seq_id: int, embeds: np.ndarray, is_image: np.ndarray):
        """One sequence's chunk [n, hidden] whose rows where `is_image` are image tokens (of a
        model whose images attend bidirectionally): the text runs before and after each image
        and each image's tokens prefill as forwards of their own, in order; the logits after
        the chunk's last token, [vocab]."""
        bounds = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
        chunk = self.model.prefill_chunk
        logits = None
        for segment, image in zip(
            np.split(embeds, bounds), np.split(is_image, bounds), strict=True
        ):
            if image[0] and len(segment) > 1:
                logits = self._forward(self._prefill_block, [seq_id], [segment])[0]
                continue
            # Text, or one image token (which sees its block causally too; and the cache
            # attends a lone token as a decode step, which the block entry does not expect).
            for start in range(0, len(segment), chunk):
                logits = self.prefill_embeddings([seq_id], [segment[start : start + chunk]])[0]
        return logits

    def prefill_embeddings(self, seq_ids: list[int], chunks: list[np.ndarray]) -> np.ndarray:
        """As CompiledModel.prefill, from embeddings: chunks[i] ([n_i, hidden]) appended to
        sequence seq_ids[i]; logits after each chunk's last token, [len(seq_ids), vocab]."""
        return self._forward(self._prefill, seq_ids, chunks)

    def _forward(self, entry, seq_ids: list[int], chunks: list[np.ndarray]) -> np.ndarray:
        model = self.model
        lengths = [len(c) for c in chunks]
        if not all(lengths) or sum(lengths) > model.prefill_chunk:
            raise RelaxlmError(
                f"prefill chunks of {lengths} tokens: each needs >= 1 token and "
                f"{model.prefill_chunk} is the most in one forward; split them"
            )
        flat = np.concatenate(chunks).astype(np.float32)[None]  # [1, total, hidden]
        last = np.cumsum(lengths, dtype="int32") - 1
        begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        begin(model.kv_cache, ShapeTuple(seq_ids), ShapeTuple(lengths))
        logits = entry(
            tvm.runtime.tensor(flat, model.device),
            tvm.runtime.tensor(last, model.device),
            model.kv_cache,
            model.params,
        )
        end(model.kv_cache)
        return logits.numpy()[0]

"""Qwen2.5-VL's images in: preprocessing equal to Qwen2VLImageProcessor, the vision tower's
inputs (patches in window order, their rotary positions, windows and images), and the
prompt's multimodal RoPE (M-RoPE) positions.

Everything comes from the manifest's `vision` entry (frontends/qwen2_vl.py). M-RoPE gives an
image's tokens (time, row, column) positions and text after an image continues at the largest
position + 1, so a prompt's positions end below its length. They are shifted by that gap (the
sequence's `delta`): text after the images then sits at its KV-cache position, and decode steps
rotate at cache positions as for text; RoPE being relative, the shift changes no score.
"""

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from relaxlm.errors import RelaxlmError

from .vision import ImagePrompt, _each, _to_rgb, load_image


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The (height, width) Qwen2VLImageProcessor resizes to: multiples of `factor` near the
    image's size, with between min_pixels and max_pixels pixels."""
    if max(height, width) / min(height, width) > 200:
        raise RelaxlmError(
            f"an image of {width}x{height} pixels is too narrow for Qwen2.5-VL (its aspect ratio "
            "must be below 200); crop or pad it"
        )
    h_bar = round(height / factor) * factor  # Python's round, half to even, as transformers
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenImage:
    """One preprocessed image: patches [t * h * w, C * T * P * P] in merge-block order (as
    transformers' processor) and its patch grid (t, h, w)."""

    patches: np.ndarray
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class QwenImageProcessor:
    """Qwen2VLImageProcessor's steps in numpy and Pillow: RGB (alpha composited on white),
    `smart_resize` with the checkpoint's filter, rescale, normalize, patchify."""

    min_pixels: int
    max_pixels: int
    resample: int
    do_convert_rgb: bool
    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    patch_size: int
    temporal_patch_size: int
    merge_size: int

    @classmethod
    def from_manifest(cls, vision: dict[str, Any]) -> "QwenImageProcessor":
        return cls(
            min_pixels=int(vision["min_pixels"]),
            max_pixels=int(vision["max_pixels"]),
            resample=int(vision["resample"]),
            do_convert_rgb=bool(vision["do_convert_rgb"]),
            rescale_factor=float(vision["rescale_factor"]),
            image_mean=tuple(vision["image_mean"]),
            image_std=tuple(vision["image_std"]),
            patch_size=int(vision["patch_size"]),
            temporal_patch_size=int(vision["temporal_patch_size"]),
            merge_size=int(vision["merge_size"]),
        )

    def __call__(self, image) -> QwenImage:
        if self.do_convert_rgb:
            image = _to_rgb(image)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width = smart_resize(
            image.height, image.width, p * m, self.min_pixels, self.max_pixels
        )
        image = image.resize((width, height), resample=self.resample, reducing_gap=None)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        # As transformers: rescale in float64, then float32; normalize in float32.
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        x = x.transpose(2, 0, 1)  # [C, H, W]
        c, gh, gw = x.shape[0], height // p, width // p
        # One image is one frame, repeated to fill the temporal patch.
        frames = np.broadcast_to(x[None], (t, c, height, width))
        frames = frames.reshape(1, t, c, gh // m, m, p, gw // m, m, p)
        # -> [1, gh/m, gw/m, m, m, C, T, P, P]: each merge block's patches together.
        patches = frames.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, c * t * p * p)
        return QwenImage(np.ascontiguousarray(patches, dtype=np.float32), (1, gh, gw))


@dataclass(frozen=True)
class TowerInputs:
    """encode_images' inputs for some images, and the order that undoes the windows."""

    pixel_values: np.ndarray  # [n, C * T * P * P], window order
    rotary_positions: np.ndarray  # [n, 2] int32 (row, column)
    window_segments: np.ndarray  # [n] int32
    image_segments: np.ndarray  # [n] int32
    unit_order: np.ndarray  # [n / merge^2]: the merged token each output row is


def tower_inputs(images: list[QwenImage], merge: int, window: int) -> TowerInputs:
    """Patches of several images -> the tower's inputs, as transformers'
    `rot_pos_emb` and `get_window_index` order them.

    window: the side of an attention window in merged tokens (window_size / merge / patch).
    """
    units = merge * merge
    order, rotary, windows, segments = [], [], [], []
    unit_base, window_id, segment_id = 0, 0, 0
    for image in images:
        t, gh, gw = image.grid
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # [gh, gw] each
        blocks = (gh // merge, merge, gw // merge, merge)
        # (row, column) per patch in merge-block order, the order of the patches.
        pos = np.stack(
            [a.reshape(blocks).transpose(0, 2, 1, 3).ravel() for a in (rows, cols)], axis=-1
        )  # [gh * gw, 2]
        lh, lw = gh // merge, gw // merge
        # Merged tokens in windows of window x window, the grid padded at the bottom/right.
        nh, nw = -(-lh // window), -(-lw // window)
        index = np.full((t, nh * window, nw * window), -1)
        index[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        index = index.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4)
        index = index.reshape(t * nh * nw, window * window)
        for frame_windows in np.split(index, t):
            for w in frame_windows:
                kept = w[w >= 0]
                if not len(kept):
                    continue
                order.extend(kept + unit_base)
                windows.extend([window_id] * len(kept))
                window_id += 1
        for _ in range(t):  # full attention spans one frame of one image
            segments.append(np.full(lh * lw, segment_id))
            segment_id += 1
        rotary.append(np.tile(pos, (t, 1)))
        unit_base += t * lh * lw
    unit_order = np.asarray(order, dtype=np.int64)
    patch_order = (unit_order[:, None] * units + np.arange(units)).ravel()
    patches = np.concatenate([image.patches for image in images])
    per_unit = np.concatenate(segments)[unit_order]
    return TowerInputs(
        pixel_values=patches[patch_order],
        rotary_positions=np.concatenate(rotary)[patch_order].astype(np.int32),
        window_segments=np.repeat(np.asarray(windows, dtype=np.int32), units),
        image_segments=np.repeat(per_unit.astype(np.int32), units),
        unit_order=unit_order,
    )


def mrope_positions(
    token_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]], merge: int
) -> tuple[np.ndarray, int]:
    """A prompt's M-RoPE positions [3, n] (time, row, column) and its delta (largest
    position + 1 - n), as transformers' `get_rope_index` for images: each run of image
    tokens is one image's (t, h / merge, w / merge) grid, placed after the text before it;
    text continues after the largest position.
    """
    ids = np.asarray(token_ids)
    at = ids == image_token_id
    positions = np.zeros((3, len(ids)), dtype=np.int64)
    next_pos, i, k = 0, 0, 0
    while i < len(ids):
        if not at[i]:
            positions[:, i] = next_pos
            next_pos += 1
            i += 1
            continue
        if k >= len(grids):
            raise RelaxlmError(
                f"the prompt has more image-token runs than its {len(grids)} images; put one "
                "run of image tokens per image"
            )
        t, h, w = grids[k][0], grids[k][1] // merge, grids[k][2] // merge
        n = t * h * w
        if not at[i : i + n].all() or (i + n < len(ids) and at[i + n]):
            raise RelaxlmError(
                f"image {k} needs a run of {n} image tokens in the prompt; expand each image's "
                "placeholder to its count"
            )
        # Images have no time: every frame of one image sits at time 0 (Qwen2.5-VL).
        tt, hh, ww = np.meshgrid(np.zeros(t), np.arange(h), np.arange(w), indexing="ij")
        positions[:, i : i + n] = next_pos + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
        next_pos = int(positions[:, i : i + n].max()) + 1
        i += n
        k += 1
    if k != len(grids):
        raise RelaxlmError(
            f"the prompt has {k} runs of image tokens for {len(grids)} images; put one per image"
        )
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


class QwenImageEncoder:
    """A Qwen2.5-VL artifact's image entries over a loaded CompiledModel: images -> features,
    prompts -> embeddings and shifted M-RoPE positions, and prefill from them."""

    mrope = True  # prefill takes each chunk's positions

    def __init__(self, model):
        vision = model.manifest.vision
        if vision.get("processor") != "qwen2_vl":
            raise RelaxlmError(
                f"{model.folder} ({model.manifest.architecture}) is not a Qwen2.5-VL model"
            )
        self.model = model
        self.processor = QwenImageProcessor.from_manifest(vision)
        self.image_token_id = int(vision["image_token_id"])
        self.hidden_size = int(vision["hidden_size"])
        self.merge = int(vision["merge_size"])
        self.window = int(vision["window_size"]) // self.merge // int(vision["patch_size"])
        self.vision_start_id = int(vision["vision_start_token_id"])
        self.vision_end_id = int(vision["vision_end_token_id"])
        self._encode = model.vm["encode_images"]
        self._embed = model.vm["embed_tokens"]
        self._prefill = model.vm["prefill_embeds"]

    @property
    def placeholder_ids(self) -> list[int]:
        """What a prompt holds per image before expansion, as Qwen's chat template writes it."""
        return [self.vision_start_id, self.image_token_id, self.vision_end_id]

    def image(self, source) -> QwenImage:
        """One source (see `load_image`) -> its patches and grid."""
        return self.processor(load_image(source))

    def num_tokens(self, image: QwenImage) -> int:
        t, h, w = image.grid
        return t * h * w // self.merge**2

    def tower_inputs(self, images: list[QwenImage]) -> TowerInputs:
        return tower_inputs(images, self.merge, self.window)

    def features(self, images: list[QwenImage]) -> list[np.ndarray]:
        """Images -> each one's [num_tokens, hidden] features (one tower run for all)."""
        inputs = self.tower_inputs(images)
        dev = self.model.device
        out = self._encode(
            tvm.runtime.tensor(inputs.pixel_values, dev),
            tvm.runtime.tensor(inputs.rotary_positions, dev),
            tvm.runtime.tensor(inputs.window_segments, dev),
            tvm.runtime.tensor(inputs.image_segments, dev),
            self.model.params,
        ).numpy()
        merged = np.empty_like(out)
        merged[inputs.unit_order] = out  # undo the window order
        return np.split(merged, np.cumsum([self.num_tokens(i) for i in images])[:-1])

    def expand_text(self, text: str, token_text) -> str:
        """The text as it is: the image markers the template writes are tokens (see `expand`)."""
        return text

    def expand(self, token_ids: list[int], counts: list[int]) -> list[int]:
        """Each image token repeated to its image's count, in order."""
        out: list[int] = []
        k = 0
        for t in token_ids:
            if t == self.image_token_id and k < len(counts):
                out.extend([t] * counts[k])
                k += 1
            else:
                out.append(t)
        return out

    def embeddings(self, token_ids: list[int], features: list[np.ndarray]) -> np.ndarray:
        """Expanded prompt ids and the images' features -> [n, hidden] embeddings."""
        ids = np.asarray(token_ids, dtype=np.int32)
        at = ids == self.image_token_id
        counts = [len(f) for f in features]
        if int(at.sum()) != sum(counts):
            raise RelaxlmError(
                f"the prompt has {int(at.sum())} image tokens but {len(features)} images need "
                f"{sum(counts)} ({_each(counts) if counts else 'none'}); expand one placeholder "
                "per image to its count"
            )
        x = tvm.runtime.tensor(ids.reshape(1, -1), self.model.device)
        embeds = self._embed(x, self.model.params).numpy()[0]
        if counts:
            embeds[at] = np.concatenate(features)
        return embeds

    def positions(self, token_ids: list[int], images: list[QwenImage]) -> tuple[np.ndarray, int]:
        """The prompt's M-RoPE positions shifted by its delta ([3, n] int32), and the delta
        (store it with the sequence: its decode positions are cache positions + delta)."""
        grids = [image.grid for image in images]
        positions, delta = mrope_positions(token_ids, self.image_token_id, grids, self.merge)
        return (positions - delta).astype(np.int32), delta

    def prefill_embeddings(
        self, seq_ids: list[int], chunks: list[np.ndarray], positions: list[np.ndarray]
    ) -> np.ndarray:
        """As CompiledModel.prefill from embeddings: chunks[i] ([n_i, hidden]) at shifted
        positions[i] ([3, n_i]) appended to sequence seq_ids[i]; logits after each chunk."""
        model = self.model
        lengths = [len(c) for c in chunks]
        if not all(lengths) or sum(lengths) > model.prefill_chunk:
            raise RelaxlmError(
                f"prefill chunks of {lengths} tokens: each needs >= 1 token and "
                f"{model.prefill_chunk} is the most in one forward; split them"
            )
        flat = np.concatenate(chunks).astype(np.float32)[None]  # [1, total, hidden]
        pos = np.concatenate(positions, axis=1).astype(np.int32)  # [3, total]
        last = np.cumsum(lengths, dtype="int32") - 1
        begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        begin(model.kv_cache, ShapeTuple(seq_ids), ShapeTuple(lengths))
        logits = self._prefill(
            tvm.runtime.tensor(flat, model.device),
            tvm.runtime.tensor(last, model.device),
            tvm.runtime.tensor(pos, model.device),
            model.kv_cache,
            model.params,
        )
        end(model.kv_cache)
        return logits.numpy()[0]

    def prompt(self, token_ids: list[int], images: list, lock=None) -> ImagePrompt:
        """A prompt holding one image token per image (as the chat template writes it) and the
        images (sources for `load_image`) -> the engine's ImagePrompt, with its positions.

        As LLaVA's (runtime/vision.py), each image's tokens get ids past the vocabulary drawn
        from a hash of its features, so the prefix cache reuses pages only for the same image
        in the same place. The positions are shifted by the whole prompt's delta, so a shifted
        prompt's pages go under a cache key drawn from the delta: a cached page then only
        serves a prompt whose shift is the same.
        """
        found = sum(t == self.image_token_id for t in token_ids)
        if found != len(images):
            raise RelaxlmError(
                f"the prompt has {found} image placeholders for {len(images)} images; put one "
                "per image (the chat template writes them for image content parts)"
            )
        loaded = [self.image(image) for image in images]
        counts = [self.num_tokens(image) for image in loaded]
        ids = self.expand(token_ids, counts)
        window = self.model.context_window
        if len(ids) > window:
            raise RelaxlmError(
                f"{len(images)} images take {sum(counts)} tokens ({_each(counts)}); with the text "
                f"the prompt has {len(ids)}, more than the context window of {window}; send "
                "fewer or smaller images, or less text"
            )
        positions, delta = self.positions(ids, loaded)
        with lock or contextlib.nullcontext():
            features = self.features(loaded) if images else []
        vocab = self.model.vocab_size
        # Each image's run of tokens -> ids from its features' hash, `window` apart, so no
        # two images' ids overlap.
        at = np.asarray(ids) == self.image_token_id
        starts = np.flatnonzero(at & ~np.r_[False, at[:-1]])
        out, rows = list(ids), {}
        for start, feats in zip(starts, features, strict=True):
            digest = hashlib.sha256(feats.tobytes()).digest()
            base = vocab + int.from_bytes(digest[:6], "little") * window
            out[start : start + len(feats)] = range(base, base + len(feats))
            rows.update(zip(range(base, base + len(feats)), feats, strict=True))
        key = 0
        if delta:
            shift = hashlib.sha256(b"mrope-shift" + delta.to_bytes(8, "little", signed=True))
            key = int.from_bytes(shift.digest()[:8], "little")
        return ImagePrompt(out, rows, self.image_token_id, positions, key)

    def prefill_tokens(
        self,
        seq_ids: list[int],
        chunks: list[list[int]],
        rows: dict[int, np.ndarray],
        positions: list[np.ndarray],
    ) -> np.ndarray:
        """As CompiledModel.prefill over token ids where ids in `rows` (an ImagePrompt's
        image ids) stand for their rows, each chunk at its positions ([3, len])."""
        flat = np.fromiter((t for c in chunks for t in c), dtype=np.int64)
        at = flat >= self.model.vocab_size
        ids = np.where(at, 0, flat).astype(np.int32)  # their embedding rows are replaced
        x = tvm.runtime.tensor(ids.reshape(1, -1), self.model.device)
        embeds = self._embed(x, self.model.params).numpy()[0]  # [total, hidden]
        if at.any():
            embeds[at] = np.stack([rows[int(t)] for t in flat[at]])
        splits = np.cumsum([len(c) for c in chunks])[:-1]
        return self.prefill_embeddings(seq_ids, np.split(embeds, splits), positions)

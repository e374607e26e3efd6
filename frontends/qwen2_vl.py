"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a ViT over dynamic-resolution patches
with window attention, a patch merger, and a Qwen2 trunk (frontends/llama.py) whose RoPE is
multimodal (M-RoPE).

Vision tower. The runtime (runtime/vision_qwen.py) cuts an image into patches of
temporal_patch_size frames x patch_size^2 pixels, already in the window order transformers
uses, and passes per patch: its (row, column) for the tower's 2D rotary embedding, its
window and its image. Attention is bidirectional within a window (layers not in
`fullatt_block_indexes`) or within an image (the others), written as a mask over all
patches of all images at once, since images never touch the KV cache. The patch embedding
(a bias-free conv3d with stride = kernel) is one matmul. The merger joins each
spatial_merge_size^2 block of patches (contiguous in that order) into one text-width token;
the runtime undoes the window order.

Trunk. M-RoPE gives every token three positions (time, row, column; equal for text), and
`mrope_section` says which rotary frequencies take which. The cache cannot apply that, so the
attention calls carry no RoPE and q/k are rotated in the graph: `prefill_embeds` takes the
prompt's positions [3, n] (shifted by the runtime so text after the images sits at its cache
position); `prefill` and `decode`, text only, take the cache's positions on all three axes.
As RoPE is relative, the shift changes no attention score.

Qwen2-VL (`Qwen2VLForConditionalGeneration`, at the end) is the same graph with its tower's
blocks: LayerNorm, an fc1/fc2 MLP, full attention in every block.

Parameter names: the hub's checkpoints, and transformers 5.25's save_pretrained, use
`visual.*`, `model.*`, `lm_head`; transformers 5's module tree, `model.visual.*`,
`model.language_model.*`, `lm_head`, loads too. Both trees are built.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import activation, from_config
from .entry import VisionLM
from .llama import (
    LlamaAttention,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaModel,
    qwen2_config,
)
from .llava import pixel_settings
from .ops import attention, query_positions

# Qwen2VLImageProcessor's defaults (OpenAI CLIP statistics, bicubic, 56*56 .. 28*28*1280 pixels).
QWEN_MEAN = [0.48145466, 0.4578275, 0.40821073]
QWEN_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_BICUBIC = 3
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
_MASKED = -1e30  # an attention score no window or image lets through


@dataclass
class Qwen2_5_VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    hidden_act: str = "silu"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Derived, not config.json keys: the 2D rotary's base; Qwen2-VL's LayerNorm / fc1-fc2 blocks.
    rope_theta: float = 10000.0
    qwen2_blocks: bool = False

    @classmethod
    def qwen2(cls, raw: dict[str, Any]) -> "Qwen2_5_VisionConfig":
        """Qwen2-VL's vision config: `embed_dim` is the tower's width and `hidden_size` the
        trunk's; full attention in every block (no windows)."""
        width, depth = raw.get("embed_dim", 1280), raw.get("depth", 32)
        return from_config(
            cls,
            {
                **raw,
                "hidden_size": width,
                "out_hidden_size": raw.get("hidden_size", 3584),
                "intermediate_size": width * raw.get("mlp_ratio", 4),
                "hidden_act": raw.get("hidden_act", "quick_gelu"),
                "fullatt_block_indexes": list(range(depth)),
                # One merged token per window: the window order is the patches' own.
                "window_size": raw.get("patch_size", 14) * raw.get("spatial_merge_size", 2),
                "qwen2_blocks": True,
            },
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_width(self) -> int:
        """One patch row's length: channels x frames x pixels."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class Qwen2_5_VLConfig:
    vision_config: dict[str, Any]
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Derived, not config.json keys:
    vision: Qwen2_5_VisionConfig | None = None
    text: LlamaConfig | None = None
    mrope_section: list[int] = field(default_factory=list)
    rope_theta: float = 1000000.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen2_5_VLConfig":
        config = from_config(cls, raw)
        config.vision = cls.vision_reader(config.vision_config)
        vision_rope = config.vision_config.get("rope_parameters") or {}
        config.vision.rope_theta = float(
            vision_rope.get("rope_theta", config.vision_config.get("rope_theta", 10000.0))
        )
        # transformers 5 nests the trunk under text_config; transformers 4 keeps it top-level.
        text_raw = {**raw, **raw.get("text_config", {})}
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        config.mrope_section = list(rope.get("mrope_section") or [])
        config.rope_theta = float(rope.get("rope_theta", text_raw.get("rope_theta", 1e6)))
        # M-RoPE is rotated in the graph here; the trunk's own RoPE settings go unused.
        text_raw = {**text_raw, "rope_parameters": {"rope_type": "default"}, "rope_scaling": None}
        config.text = qwen2_config(text_raw)
        v, t = config.vision, config.text
        if sum(config.mrope_section) * 2 != t.head_dim:
            raise RelaxlmError(
                f"config.json: mrope_section {config.mrope_section} must sum to half the trunk's "
                f"head_dim ({t.head_dim // 2}); set rope_parameters.mrope_section"
            )
        if v.out_hidden_size != t.hidden_size:
            raise RelaxlmError(
                f"config.json: vision_config.out_hidden_size {v.out_hidden_size} differs from "
                f"the text hidden_size {t.hidden_size}"
            )
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise RelaxlmError(
                f"config.json: vision_config.hidden_size {v.hidden_size} over num_heads "
                f"{v.num_heads} must give a head size that is a multiple of 4 (2D rotary)"
            )
        if v.window_size % (v.patch_size * v.spatial_merge_size):
            raise RelaxlmError(
                f"config.json: vision_config.window_size {v.window_size} is not a multiple of "
                f"patch_size x spatial_merge_size ({v.patch_size * v.spatial_merge_size})"
            )
        if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
            raise RelaxlmError(
                f"config.json: vision_config.fullatt_block_indexes {v.fullatt_block_indexes} "
                f"lie outside the tower's {v.depth} blocks"
            )
        if not 0 <= config.image_token_id < t.vocab_size:
            raise RelaxlmError(
                f"config.json: image_token_id {config.image_token_id} lies outside the "
                f"vocabulary (size {t.vocab_size})"
            )
        return config

    @staticmethod
    def vision_reader(raw: dict[str, Any]) -> Qwen2_5_VisionConfig:
        return from_config(Qwen2_5_VisionConfig, raw)

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def context_window(self) -> int:
        return self.text.context_window


def _relax(fn, *tensors: nn.Tensor, name: str) -> nn.Tensor:
    """A Relax op that `nn.op` lacks, over nn tensors."""
    return nn.wrap_nested(fn(*[t._expr for t in tensors]), name=name)


def _rotate(x: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor) -> nn.Tensor:
    """HF rotate-half RoPE in float32: x * cos + [-x2, x1] * sin over the last axis."""
    x = x.astype("float32")
    x1, x2 = nn.op.split(x, 2, axis=-1)
    rotated = nn.op.concat([x2 * -1.0, x1], dim=-1)
    return x * cos + rotated * sin


def _cos_sin(angles: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
    """[..., d/2] rotation angles -> cos, sin of [angles, angles]: [..., d] each."""
    emb = nn.op.concat([angles, angles], dim=-1)
    return _relax(relax.op.cos, emb, name="cos"), _relax(relax.op.sin, emb, name="sin")


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    """RoPE's inverse frequencies for `dim` rotated dims, float32 as transformers."""
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(
        np.float32
    )


# -- vision tower ----------------------------------------------------------------------------


class _Conv3dWeight(nn.Module):
    """`patch_embed.proj`: the conv3d's weight only (bias-free)."""

    def __init__(self, v: Qwen2_5_VisionConfig):
        t, p = v.temporal_patch_size, v.patch_size
        self.weight = nn.Parameter((v.hidden_size, v.in_channels, t, p, p))


class Qwen2_5_VisionPatchEmbed(nn.Module):
    """conv3d with stride = kernel over [C, T, P, P] patches: one matmul per patch row."""

    def __init__(self, v: Qwen2_5_VisionConfig):
        self.proj = _Conv3dWeight(v)

    def forward(self, patches: nn.Tensor) -> nn.Tensor:
        weight = self.proj.weight  # [hidden, C, T, P, P]
        weight = nn.op.reshape(weight, (weight.shape[0], patches.shape[1]))  # [hidden, CTPP]
        return nn.op.matmul(patches.astype(weight.dtype), nn.op.permute_dims(weight))


class Qwen2_5_VLVisionAttention(nn.Module):
    def __init__(self, v: Qwen2_5_VisionConfig):
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=True)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, bias=True)

    def forward(self, x, cos, sin, bias) -> nn.Tensor:
        """x [n, hidden]; cos, sin [n, 1, head_dim]; bias [n, n] (0 or masked)."""
        n, h = x.shape
        qkv = nn.op.reshape(self.qkv(x), (n, 3, self.num_heads, self.head_dim))
        heads = (n, self.num_heads, self.head_dim)
        q, k, v = (nn.op.reshape(t, heads) for t in nn.op.split(qkv, 3, axis=1))
        q = nn.op.permute_dims(_rotate(q, cos, sin), [1, 0, 2])  # [H, n, d]
        k = nn.op.permute_dims(_rotate(k, cos, sin), [1, 2, 0])  # [H, d, n]
        v = nn.op.permute_dims(v, [1, 0, 2])  # [H, n, d]
        scores = nn.op.matmul(q, k) * (1.0 / math.sqrt(self.head_dim)) + bias
        # Bidirectional: the mask keeps a patch's window (or image), nothing causal.
        probs = nn.op.softmax(scores, axis=-1).astype(x.dtype)
        out = nn.op.permute_dims(nn.op.matmul(probs, v), [1, 0, 2])  # [n, H, d]
        return self.proj(nn.op.reshape(out, (n, h)))


class Qwen2_5_VLMLP(nn.Module):
    def __init__(self, v: Qwen2_5_VisionConfig):
        h, i = v.hidden_size, v.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=True)
        self.up_proj = nn.Linear(h, i, bias=True)
        self.down_proj = nn.Linear(i, h, bias=True)
        self.act = activation("vision_config.hidden_act", v.hidden_act)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2VLVisionMlp(nn.Module):
    """Qwen2-VL's block MLP: fc1, activation, fc2."""

    def __init__(self, v: Qwen2_5_VisionConfig):
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)
        self.act = activation("vision_config.hidden_act", v.hidden_act)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _vision_norm(v: Qwen2_5_VisionConfig) -> nn.Module:
    """RMSNorm in Qwen2.5-VL's tower, LayerNorm in Qwen2-VL's; eps 1e-6 in both."""
    if v.qwen2_blocks:
        return nn.LayerNorm(v.hidden_size, 1e-6)
    return nn.RMSNorm(v.hidden_size, -1, 1e-6, bias=False)


class Qwen2_5_VLVisionBlock(nn.Module):
    def __init__(self, v: Qwen2_5_VisionConfig):
        self.norm1 = _vision_norm(v)
        self.norm2 = _vision_norm(v)
        self.attn = Qwen2_5_VLVisionAttention(v)
        self.mlp = Qwen2VLVisionMlp(v) if v.qwen2_blocks else Qwen2_5_VLMLP(v)

    def forward(self, x, cos, sin, bias) -> nn.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, bias)
        return x + self.mlp(self.norm2(x))


class _GELU(nn.Module):
    """The merger MLP's middle entry (`mlp.1`, no weights)."""

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.gelu(x)


class Qwen2_5_VLPatchMerger(nn.Module):
    def __init__(self, v: Qwen2_5_VisionConfig):
        self.group = v.spatial_merge_size**2
        width = self.width = v.hidden_size * self.group
        self.ln_q = _vision_norm(v)
        self.mlp = nn.ModuleList(
            [nn.Linear(width, width), _GELU(), nn.Linear(width, v.out_hidden_size)]
        )

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        # [n, hidden] -> [n / merge^2, merge^2 * hidden]: each block's patches are contiguous.
        x = nn.op.reshape(self.ln_q(x), (x.shape[0] // self.group, self.width))
        for layer in self.mlp:
            x = layer(x)
        return x


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, v: Qwen2_5_VisionConfig):
        self.config = v
        self.patch_embed = Qwen2_5_VisionPatchEmbed(v)
        self.blocks = nn.ModuleList([Qwen2_5_VLVisionBlock(v) for _ in range(v.depth)])
        self.merger = Qwen2_5_VLPatchMerger(v)

    def forward(self, patches, rotary_positions, window_segments, image_segments) -> nn.Tensor:
        """patches [n, C*T*P*P] in window order; rotary_positions [n, 2] (row, column);
        window_segments, image_segments [n] int32 -> [n / merge^2, out hidden] merged tokens,
        still in window order."""
        v = self.config
        n = patches.shape[0]
        x = self.patch_embed(patches)
        # 2D rotary: a quarter of the head's frequencies per axis, rows first, then columns.
        inv = nn.Tensor.from_const(_inv_freq(v.head_dim // 2, v.rope_theta))  # [d / 4]
        angles = nn.op.reshape(rotary_positions.astype("float32"), (n, 2, 1)) * inv
        cos, sin = _cos_sin(nn.op.reshape(angles, (n, 1, v.head_dim // 2)))  # [n, 1, d]

        def mask(segments: nn.Tensor) -> nn.Tensor:  # [n, n]: 0 within a segment
            rows = nn.op.reshape(segments, (n, 1))
            cols = nn.op.reshape(segments, (1, n))
            same = _relax(relax.op.equal, rows, cols, name="same_segment")
            zero, masked = relax.const(0.0, "float32"), relax.const(_MASKED, "float32")
            return _relax(lambda c: relax.op.where(c, zero, masked), same, name="mask")

        window, full = mask(window_segments), mask(image_segments)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in v.fullatt_block_indexes else window)
        return self.merger(x)


# -- text trunk with M-RoPE ------------------------------------------------------------------


class Qwen2VLAttention(LlamaAttention):
    """Qwen2's attention with q and k rotated here (M-RoPE), none in the cache."""

    def forward(self, x: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor) -> nn.Tensor:
        b, s, _ = x.shape
        hq, hkv = self.num_q_heads, self.num_kv_heads
        q, k, v = nn.op.split(self.project_qkv(x), [hq, hq + hkv], axis=2)
        qkv = nn.op.concat(
            [_rotate(q, cos, sin).astype(x.dtype), _rotate(k, cos, sin).astype(x.dtype), v], dim=2
        )
        out = attention(
            qkv,
            layer_id=self.layer_id,
            num_q_heads=hq,
            num_kv_heads=hkv,
            sm_scale=self.sm_scale,
            rope=None,
            sliding_window=self.sliding_window,
        )  # [b, s, q_heads, head_dim]
        return self.o_proj(nn.op.reshape(out, (b, s, hq * self.head_dim)))


class Qwen2VLDecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen2VLAttention

    def forward(self, x: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2VLTextModel(LlamaModel):
    layer_class = Qwen2VLDecoderLayer

    def __init__(self, config: LlamaConfig, mrope_section: list[int], theta: float):
        super().__init__(config)
        d = config.head_dim
        # Rotary dim j (of d) turns at inv_freq[j mod d/2] times the position on the axis
        # (0 time, 1 row, 2 column) whose mrope_section holds j mod d/2.
        axis = np.repeat(np.arange(3), mrope_section)
        self._axis = np.concatenate([axis, axis]).astype("int32")  # [d]
        inv = _inv_freq(d, theta)
        self._inv = np.concatenate([inv, inv]).astype("float32")  # [d]

    def rope(self, positions: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor]:
        """positions [3, b, s] int32 -> cos, sin [b, s, 1, head_dim]."""
        _, b, s = positions.shape
        per_dim = nn.op.take(positions, nn.Tensor.from_const(self._axis), axis=0)  # [d, b, s]
        d = per_dim.shape[0]
        inv = nn.Tensor.from_const(self._inv.reshape(d, 1, 1))
        angles = nn.op.permute_dims(per_dim.astype("float32") * inv, [1, 2, 0])  # [b, s, d]
        angles = nn.op.reshape(angles, (b, s, 1, d))
        return _relax(relax.op.cos, angles, name="cos"), _relax(relax.op.sin, angles, name="sin")

    def forward(self, x: nn.Tensor, positions: nn.Tensor) -> nn.Tensor:
        cos, sin = self.rope(positions)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class _Model(nn.Module):
    """transformers 5's `model`: the tower and the trunk side by side."""

    def __init__(self, config: Qwen2_5_VLConfig):
        self.visual = Qwen2_5_VisionTransformer(config.vision)
        self.language_model = Qwen2VLTextModel(config.text, config.mrope_section, config.rope_theta)


class Qwen2_5_VLForConditionalGeneration(VisionLM):
    def __init__(self, config: Qwen2_5_VLConfig, legacy_names: bool = False):
        self.config = config
        if legacy_names:
            self.visual = Qwen2_5_VisionTransformer(config.vision)
            self.model = Qwen2VLTextModel(config.text, config.mrope_section, config.rope_theta)
        else:
            self.model = _Model(config)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def for_tensors(cls, config: Qwen2_5_VLConfig, names) -> "Qwen2_5_VLForConditionalGeneration":
        """The tree whose parameter names are the checkpoint's (transformers 4 or 5)."""
        return cls(config, any(n.startswith("visual.") for n in names))

    @property
    def tower(self) -> Qwen2_5_VisionTransformer:
        return self.model.visual if isinstance(self.model, _Model) else self.visual

    @property
    def trunk(self) -> Qwen2VLTextModel:
        return self.model.language_model if isinstance(self.model, _Model) else self.model

    @property
    def hidden_size(self) -> int:
        return self.config.text.hidden_size

    def image_inputs(self) -> dict[str, Any]:
        n = "num_patches"
        return {
            "pixel_values": nn.spec.Tensor([n, self.config.vision.patch_width], "float32"),
            "rotary_positions": nn.spec.Tensor([n, 2], "int32"),
            "window_segments": nn.spec.Tensor([n], "int32"),
            "image_segments": nn.spec.Tensor([n], "int32"),
        }

    def prefill_position_inputs(self) -> dict[str, Any]:
        return {"positions": nn.spec.Tensor([3, "num_tokens"], "int32")}

    def encode_images(self, pixel_values, rotary_positions, window_segments, image_segments):
        out = self.tower(pixel_values, rotary_positions, window_segments, image_segments)
        return out.astype("float32")  # [n / merge^2, hidden], window order

    def embed_tokens(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.trunk.embed_tokens(input_ids).astype("float32")

    def hidden_states(self, input_ids: nn.Tensor) -> nn.Tensor:
        # Text only: every axis at the cache's position.
        b, s = input_ids.shape
        positions = nn.op.broadcast_to(
            nn.op.reshape(query_positions(input_ids), (1, b, s)), (3, b, s)
        )
        return self.trunk(self.trunk.embed(input_ids), positions)

    def prefill_embeds(self, embeddings, logit_positions, positions) -> nn.Tensor:
        trunk = self.trunk
        x = embeddings.astype(trunk.norm.weight.dtype)
        n = positions.shape[1]
        hidden = trunk(x, nn.op.reshape(positions, (3, 1, n)))  # [1, n, hidden]
        return self.logits(nn.op.take(hidden, logit_positions, axis=1))

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.config.text.tie_word_embeddings:
            weight = self.trunk.embed_tokens.weight  # [vocab, hidden]
            logits = nn.op.matmul(hidden, nn.op.permute_dims(weight))
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32")

    def vision_manifest(self, preprocessor: dict[str, Any] | None) -> dict[str, Any]:
        """Qwen2VLImageProcessor's settings (preprocessor_config.json, else its defaults), the
        tower's patching and the image tokens."""
        v, p = self.config.vision, preprocessor or {}
        size = p.get("size") or {}
        min_pixels = p.get("min_pixels") or size.get("shortest_edge") or MIN_PIXELS
        max_pixels = p.get("max_pixels") or size.get("longest_edge") or MAX_PIXELS
        for key, ours in (
            ("patch_size", v.patch_size),
            ("temporal_patch_size", v.temporal_patch_size),
            ("merge_size", v.spatial_merge_size),
        ):
            if p.get(key, ours) != ours:
                raise RelaxlmError(
                    f"preprocessor_config.json: {key} {p[key]} differs from the vision tower's "
                    f"{ours} (config.json vision_config); make them equal"
                )
        return {
            "processor": "qwen2_vl",
            "min_pixels": int(min_pixels),
            "max_pixels": int(max_pixels),
            **pixel_settings(p, PIL_BICUBIC, QWEN_MEAN, QWEN_STD),
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "image_token_id": self.config.image_token_id,
            "vision_start_token_id": self.config.vision_start_token_id,
            "vision_end_token_id": self.config.vision_end_token_id,
            "hidden_size": self.hidden_size,
        }


# -- Qwen2-VL: the same graph with Qwen2-VL's tower blocks --------------------------------


@dataclass
class Qwen2VLConfig(Qwen2_5_VLConfig):
    vision_reader = staticmethod(Qwen2_5_VisionConfig.qwen2)


class Qwen2VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`): LayerNorm, fc1/fc2 (quick-GELU) blocks,
    full attention throughout; the trunk, M-RoPE and preprocessing are Qwen2.5-VL's."""

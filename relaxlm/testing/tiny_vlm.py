"""Tiny random-weight vision-language checkpoints (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL), built with
transformers at test time.

Same conventions as tiny_models.py (weight scales, tokenizer), plus an `<image>` token in the
tokenizer and the checkpoint's preprocessor_config.json (CLIPImageProcessor). Needs torch and
transformers (the `test` extra).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from .tiny_models import (
    BIAS_STD,
    EMBED_GAIN,
    LINEAR_GAIN,
    NORM_RANGE,
    SPECIAL_TOKENS,
    TINY_CONFIG,
    make_tokenizer,
)

IMAGE_TOKEN = "<image>"
# ~30 K vision parameters: a 28-pixel image in 7-pixel patches, 16 image tokens per image.
TINY_VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 7,
    "projection_dim": 32,
}
# LLaVA's chat template shape: the image parts of a message become `<image>` in the text.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_llava_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
    text_arch: str = "llama",
    image_grid_pinpoints: list[list[int]] | None = None,
    **config_overrides,
) -> Path:
    """Save a random-weight float32 LlavaForConditionalGeneration checkpoint, its tokenizer
    (with `<image>`) and its preprocessor_config.json to `out_dir`.

    image_grid_pinpoints: ([height, width] pairs, multiples of the tower's image_size) a
        LlavaNextForConditionalGeneration ("anyres" tiling) with its LlavaNextImageProcessor.

    vision_overrides: CLIPVisionConfig fields over TINY_VISION_CONFIG.
    text_overrides: the trunk's config fields over TINY_CONFIG.
    config_overrides: LlavaConfig fields, e.g. vision_feature_layer=-1,
        vision_feature_select_strategy="full".
    """
    out_dir = Path(out_dir)
    make_tokenizer(out_dir, kind="spm", chat_template=LLAVA_TEMPLATE)
    image_token_id = _add_image_token(out_dir)
    vision = transformers.CLIPVisionConfig(**{**TINY_VISION_CONFIG, **(vision_overrides or {})})
    text_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[text_arch]
    text = text_cls(
        **{**TINY_CONFIG, **(text_overrides or {})},
        vocab_size=-(-(image_token_id + 1) // 8) * 8,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
    )
    next_ = image_grid_pinpoints is not None
    if next_:
        config_overrides["image_grid_pinpoints"] = image_grid_pinpoints
    arch = "LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"
    config = (transformers.LlavaNextConfig if next_ else transformers.LlavaConfig)(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=vision.image_size
        // vision.patch_size
        * (vision.image_size // vision.patch_size),
        architectures=[arch],
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(torch.float32).eval()
    _init_weights(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    side = vision.image_size
    sizes = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    if next_:
        processor = transformers.LlavaNextImageProcessor(
            **sizes, image_grid_pinpoints=image_grid_pinpoints
        )
    else:
        processor = transformers.CLIPImageProcessor(**sizes)
    processor.save_pretrained(out_dir)
    return out_dir


def _add_image_token(out_dir: Path, tokens: tuple[str, ...] = (IMAGE_TOKEN,)) -> int:
    """Add special tokens (`<image>`) to the saved tokenizer; the last one's id."""
    path = out_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save(str(path))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for token in tokens:
        config.setdefault("added_tokens_decoder", {})[str(tok.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tok.token_to_id(tokens[-1])


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """tiny_models' scales: linear and patch weights N(0, (gain / sqrt(fan_in))^2), norms
    U(0.5, 1.5), biases N(0, 0.5^2), token tables scaled to the text width."""
    gen = torch.Generator().manual_seed(seed)
    embed_std = EMBED_GAIN / math.sqrt(model.config.text_config.hidden_size)
    lo, hi = NORM_RANGE
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.split(".")[-2] or "layrnorm" in name or ".ln_q." in name:
                if name.endswith(".weight"):
                    p.copy_(torch.rand(p.shape, generator=gen) * (hi - lo) + lo)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * BIAS_STD)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * BIAS_STD)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight", "image_newline")):
                p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
            elif name.endswith(("class_embedding", "position_embedding.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim in (2, 4, 5):  # linear [out, in]; patch convolution [out, c, (t,) p, p]
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) * (LINEAR_GAIN / math.sqrt(fan_in)))
            else:
                raise ValueError(f"parameter {name} with shape {tuple(p.shape)} has no init rule")


# Qwen2.5-VL's vision tokens, in the tokenizer as the hub's checkpoints have them.
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>")
# ~60 K vision parameters: 4-pixel patches merged 2x2 into one text token, attention windows of
# 2x2 merged tokens (16 pixels) on blocks 0 and 2, the whole image on blocks 1 and 3.
TINY_QWEN_VISION_CONFIG = {
    "depth": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 4,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 16,
    "fullatt_block_indexes": [1, 3],
}
# The trunk's head_dim is 16: M-RoPE splits its 8 frequencies 2 (time), 3 (row), 3 (column).
TINY_MROPE_SECTION = [2, 3, 3]
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_qwen2_5_vl_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    min_pixels: int = 8 * 8 * 4,
    max_pixels: int = 64 * 64,
    vision_overrides: dict | None = None,
    qwen2: bool = False,
) -> Path:
    """Save a random-weight float32 Qwen2_5_VLForConditionalGeneration checkpoint, its
    tokenizer (with the vision tokens) and its preprocessor_config.json (Qwen2VLImageProcessor)
    to `out_dir`.

    min_pixels, max_pixels: the processor's bounds on a resized image's area.
    vision_overrides: vision config fields over TINY_QWEN_VISION_CONFIG.
    qwen2: a Qwen2VLForConditionalGeneration instead (LayerNorm and fc1/fc2 blocks, no
        windows; its vision config names the tower's width `embed_dim`).
    """
    out_dir = Path(out_dir)
    make_tokenizer(out_dir, kind="bpe", chat_template=QWEN_VL_TEMPLATE)
    _add_image_token(out_dir, QWEN_VL_TOKENS)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    start, end, video, pad = (tok.token_to_id(t) for t in QWEN_VL_TOKENS)
    vocab = -(-(pad + 1) // 8) * 8
    vision = {**TINY_QWEN_VISION_CONFIG, **(vision_overrides or {})}
    arch = "Qwen2VL" if qwen2 else "Qwen2_5_VL"
    if qwen2:
        vision = {
            "embed_dim": vision["hidden_size"],
            "mlp_ratio": vision["intermediate_size"] // vision["hidden_size"],
            **{k: vision[k] for k in ("depth", "num_heads", "patch_size", "temporal_patch_size")},
            "spatial_merge_size": vision["spatial_merge_size"],
        }
    text = getattr(transformers, f"{arch}TextConfig")(
        **TINY_CONFIG,
        vocab_size=vocab,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": TINY_MROPE_SECTION,
        },
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
    )
    out = {"hidden_size": text.hidden_size} if qwen2 else {"out_hidden_size": text.hidden_size}
    config = getattr(transformers, f"{arch}Config")(
        text_config=text.to_dict(),
        vision_config={**vision, **out},
        image_token_id=pad,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        architectures=[f"{arch}ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{arch}ForConditionalGeneration")(config).float().eval()
    _init_weights(model, seed)
    model.generation_config = transformers.GenerationConfig(eos_token_id=text.eos_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    transformers.Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"],
    ).save_pretrained(out_dir)
    return out_dir


# Gemma 3's image tokens, in the tokenizer as the hub's checkpoints have them.
GEMMA3_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
# Gemma 3's chat template shape: an image part becomes `<start_of_image>`, which the processor
# (and relaxlm) expand to the image's soft tokens.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# A 28-pixel image in 7-pixel patches (4x4), pooled 2x2 into 4 image tokens.
TINY_SIGLIP_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 7,
    "vision_use_head": False,  # Gemma 3 reads the last hidden state, not a pooled one
}


def make_gemma3_vl_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    mm_tokens_per_image: int = 4,
    sliding_window: int = 16,
    text_overrides: dict | None = None,
) -> Path:
    """Save a random-weight float32 Gemma3ForConditionalGeneration checkpoint (SigLIP tower,
    2-layer Gemma 3 trunk: one sliding layer, one full), its tokenizer (with the image tokens)
    and its preprocessor_config.json (Gemma3ImageProcessor) to `out_dir`."""
    out_dir = Path(out_dir)
    make_tokenizer(out_dir, kind="spm", chat_template=GEMMA3_TEMPLATE)
    _add_image_token(out_dir, ("<start_of_turn>", "<end_of_turn>", *GEMMA3_TOKENS))
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    boi, eoi, soft = (tok.token_to_id(t) for t in GEMMA3_TOKENS)
    # Named as GemmaTokenizer names them, which Gemma3Processor reads.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["extra_special_tokens"] = dict(
        zip(("boi_token", "eoi_token", "image_token"), GEMMA3_TOKENS, strict=True)
    )
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    text = transformers.Gemma3TextConfig(
        **{
            **TINY_CONFIG,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": sliding_window,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": False,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            **(text_overrides or {}),
        },
        vocab_size=-(-(soft + 1) // 8) * 8,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=0,
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=transformers.SiglipVisionConfig(**TINY_SIGLIP_CONFIG).to_dict(),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=soft,
        architectures=["Gemma3ForConditionalGeneration"],
        # Untied, as tests/hf_models.py's Gemma: a tied random head echoes the input token.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    _init_weights(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    side = TINY_SIGLIP_CONFIG["image_size"]
    transformers.Gemma3ImageProcessor(size={"height": side, "width": side}).save_pretrained(out_dir)
    return out_dir

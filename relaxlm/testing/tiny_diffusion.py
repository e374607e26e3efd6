"""Tiny random-weight diffusers pipelines, built with diffusers' and transformers' own classes
and saved with `save_pretrained`: Stable Diffusion (CLIP, a two-level UNet, a two-level VAE)
and FLUX (CLIP, T5, a one-double-one-single-block transformer, a VAE with shift_factor).
Needs torch, transformers and diffusers (the `test` extra).

Weights are drawn wider than diffusers' init (which zeroes the output and modulation layers),
so every path matters to the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

SD_SIZE = 16  # pixels; the tiny VAE upsamples 2x, so SD latents are 8 x 8
FLUX_SIZE = 32  # the VAE upsamples 2x and FLUX packs 2x2 patches: 8 x 8 image tokens
FLUX_T5_LENGTH = 32  # FluxPipeline's max_sequence_length, fixed at compile time

FLUX_DEV = {  # the scheduler_config.json of FLUX.1-dev
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

FLUX_SCHNELL = {  # timestep-distilled: no guidance embedding, no shift
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (no merges): real CLIP pre-tokenization and
    special tokens, a vocabulary of 54."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def t5_tokenizer():
    """A T5 unigram tokenizer over letters, word-initial and not (vocabulary of 55)."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in letters] + [(c, -2.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip_text(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def _vae(**options) -> diffusers.AutoencoderKL:
    """A two-level VAE of width 16 and 32 (latents of 4 channels, 2x upsampling)."""
    return diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        **options,
    )


def _widen(*modules: torch.nn.Module) -> None:
    """Weights wider than diffusers' init (which zeroes output convs and modulation layers),
    so every path matters to the image."""
    for m in modules:
        for p in m.parameters():
            p.data.normal_(0, 0.2 if p.ndim > 1 else 0.05)


def tiny_stable_diffusion(
    root: Path, linear_proj: bool = False
) -> diffusers.StableDiffusionPipeline:
    """Saved under root / "sd"; linear_proj: SD 2's linear attention projections (else 1.x's
    1x1 convolutions)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=SD_SIZE // 2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
        use_linear_projection=linear_proj,
    )
    vae = _vae()
    tokenizer = clip_tokenizer(root / "tok")
    text = _clip_text(len(tokenizer))
    _widen(unet, vae)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd")
    return pipe.to(torch.float32)


def tiny_flux(
    root: Path, guidance_embeds: bool = True, scheduler: dict = FLUX_DEV
) -> diffusers.FluxPipeline:
    """Saved under root / "flux"; guidance_embeds=False and FLUX_SCHNELL: a schnell-style one."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(root / "tok"), t5_tokenizer()
    text = _clip_text(len(tokenizer))
    text_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,  # few buckets, so 32 tokens reach the far ones
            relative_attention_max_distance=16,
        )
    )
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    text_2.eval()  # built, not loaded: T5's dropout would be on
    _widen(transformer, vae)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        text_encoder_2=text_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(root / "flux")
    return pipe.to(torch.float32)

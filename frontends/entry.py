"""The entry functions every causal LM exports, defined once for all architectures.

- `prefill(input_ids[1, n], logit_positions[b])`: the tokens of one or more sequences laid
  end to end (the KV cache knows where each begins); returns logits only at
  `logit_positions`, `[1, b, vocab]` float32.
- `decode(input_ids[b, 1])`: one new token for each of b sequences; `[b, 1, vocab]` float32.

The paged-attention pass adds the KV-cache parameter after the inputs.

A vision-language model (`VisionLM`) exports three more, so images are spliced into a prompt:
- `encode_images(pixel_values[k, c, h, w])`: k preprocessed images (float32) -> their features
  in the text trunk's width, `[k, tokens_per_image, hidden]` float32.
- `embed_tokens(input_ids[1, n])`: the token embeddings, `[1, n, hidden]` float32.
- `prefill_embeds(embeddings[1, n, hidden], logit_positions[b])`: `prefill` from embeddings
  (token embeddings with image features at the image-token positions).

A speech model (`SpeechSeq2Seq`, an encoder-decoder such as Whisper) exports instead of the
text entries (see frontends/whisper.py): `encode_audio`, `cross_kv`, and `prefill` / `decode`
that also take the cross-attention keys and values.

Every embedding model exports one entry instead, and no KV cache:
- `embed(input_ids[b, s], attention_mask[b, s])`: b texts, right-padded (real tokens first,
  mask 1 on them, 0 on padding); returns the pooled embeddings, `[b, dim]` float32.
"""

from dataclasses import dataclass, field
from typing import Any

from tvm import IRModule
from tvm.relax.frontend import nn


@dataclass
class ExportedModel:
    """What a frontend hands the compiler: the graph, its weights in order, and model facts."""

    mod: IRModule
    param_names: list[str]  # the packed-params order of the graph's functions
    param_shapes: dict[str, tuple[int, ...]]
    dtype: str
    architecture: str
    config: dict[str, Any]  # the checkpoint's config.json
    context_window: int
    vocab_size: int
    # "generate": prefill/decode over a KV cache; "embed": embed(); "transcribe": Whisper;
    # "synthesize": text to speech (frontends/vits.py)
    task: str = "generate"
    embedding: dict[str, Any] = field(default_factory=dict)  # pooling, for "embed"
    # Image preprocessing and image token, for vision-language models (runtime/vision.py).
    vision: dict[str, Any] = field(default_factory=dict)
    # Audio features and special tokens, for speech models (runtime/audio.py, runtime/whisper.py).
    speech: dict[str, Any] = field(default_factory=dict)


class CausalLM(nn.Module):
    """Base of every decoder model: subclasses give `hidden_states` and `logits`."""

    def hidden_states(self, input_ids: nn.Tensor) -> nn.Tensor:
        """[batch, seq] token ids -> [batch, seq, hidden] final hidden states (after norm)."""
        raise NotImplementedError(f"{type(self).__name__} must define hidden_states")

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        """[..., hidden] -> [..., vocab] in float32."""
        raise NotImplementedError(f"{type(self).__name__} must define logits")

    def prefill(self, input_ids: nn.Tensor, logit_positions: nn.Tensor) -> nn.Tensor:
        hidden = self.hidden_states(input_ids)  # [1, n, hidden]
        hidden = nn.op.take(hidden, logit_positions, axis=1)  # [1, b, hidden]
        return self.logits(hidden)

    def decode(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.logits(self.hidden_states(input_ids))  # [b, 1, vocab]


def export_causal_lm(model: CausalLM):
    """Export the entry functions: (IRModule, [(param name, nn.Parameter)] in packed order)."""
    return model.export_tvm(spec=_text_spec())


def _text_spec() -> dict[str, Any]:
    modes = {"param_mode": "packed", "effect_mode": "none"}
    return {
        "prefill": {
            "input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"),
            "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
            "$": modes,
        },
        "decode": {"input_ids": nn.spec.Tensor(["batch_size", 1], "int32"), "$": modes},
    }


class VisionLM(CausalLM):
    """Base of every vision-language model: a CausalLM that also gives `encode_images`,
    `embed_tokens`, `hidden_states_from_embeddings`, `image_shape` and `hidden_size`."""

    image_shape: tuple[int, int, int]  # (channels, height, width) encode_images takes
    hidden_size: int

    def prefill_embeds(self, embeddings: nn.Tensor, logit_positions: nn.Tensor) -> nn.Tensor:
        hidden = self.hidden_states_from_embeddings(embeddings)  # [1, n, hidden]
        return self.logits(nn.op.take(hidden, logit_positions, axis=1))  # [1, b, vocab]


def export_vision_lm(model: VisionLM):
    """Export prefill/decode plus the image entries: (IRModule, [(name, nn.Parameter)])."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    spec = {
        **_text_spec(),
        "encode_images": {
            "pixel_values": nn.spec.Tensor(["num_images", *model.image_shape], "float32"),
            "$": modes,
        },
        "embed_tokens": {"input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"), "$": modes},
        "prefill_embeds": {
            "embeddings": nn.spec.Tensor([1, "num_tokens", model.hidden_size], "float32"),
            "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
            "$": modes,
        },
    }
    return model.export_tvm(spec=spec)


class SpeechSeq2Seq(nn.Module):
    """Base of every speech encoder-decoder: subclasses give `encode_audio`, `cross_kv`,
    `decoder_logits`, `features_shape` and `cross_kv_shape`."""

    features_shape: tuple[int, int]  # (mel bins, frames) of one window
    cross_kv_shape: tuple[int, int, int]  # (2 * decoder layers, encoder positions, width)

    def prefill(self, input_ids: nn.Tensor, cross_kv: nn.Tensor) -> nn.Tensor:
        return self.decoder_logits(input_ids, cross_kv)  # [1, n, vocab]

    def decode(self, input_ids: nn.Tensor, cross_kv: nn.Tensor) -> nn.Tensor:
        return self.decoder_logits(input_ids, cross_kv)  # [b, 1, vocab]


def export_speech_seq2seq(model: SpeechSeq2Seq):
    """Export encode_audio, cross_kv, prefill and decode: (IRModule, [(name, nn.Parameter)])."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    layers2, positions, width = model.cross_kv_shape
    spec = {
        "encode_audio": {
            "input_features": nn.spec.Tensor(["batch_size", *model.features_shape], "float32"),
            "$": modes,
        },
        "cross_kv": {
            "encoder_states": nn.spec.Tensor(["batch_size", positions, width], "float32"),
            "$": modes,
        },
        "prefill": {
            "input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"),
            "cross_kv": nn.spec.Tensor([1, *model.cross_kv_shape], "float32"),
            "$": modes,
        },
        "decode": {
            "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
            "cross_kv": nn.spec.Tensor(["batch_size", *model.cross_kv_shape], "float32"),
            "$": modes,
        },
    }
    return model.export_tvm(spec=spec)


class Embedder(nn.Module):
    """Base of every embedding model: subclasses give `embed`."""

    def embed(self, input_ids: nn.Tensor, attention_mask: nn.Tensor) -> nn.Tensor:
        """[batch, seq] ids and mask (right-padded) -> [batch, dim] float32 embeddings."""
        raise NotImplementedError(f"{type(self).__name__} must define embed")


def export_embedding(model: Embedder):
    """Export `embed`: (IRModule, [(param name, nn.Parameter)] in packed order)."""
    modes = {"param_mode": "packed", "effect_mode": "none"}
    spec = {
        "embed": {
            "input_ids": nn.spec.Tensor(["batch_size", "seq_len"], "int32"),
            "attention_mask": nn.spec.Tensor(["batch_size", "seq_len"], "int32"),
            "$": modes,
        }
    }
    return model.export_tvm(spec=spec)

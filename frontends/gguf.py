"""GGUF files (llama.cpp's format): a checkpoint whose config, tensors and tokenizer come from
one file, read with the `gguf` package.

The file's metadata becomes an HF-style config.json for the existing model classes, its tensor
names are mapped to HF's once, here (the graph keeps HF's names), and its tokenizer is rebuilt
as tokenizer.json (gguf_tokenizer.py). Tensors are not converted: F32 / F16 / BF16 read as
arrays, llama.cpp's quantized types as their raw blocks, one row of blocks per output row
[N, K / B * bytes]; the compiler keeps those blocks (compiler/quantization.py, GGUF_SCHEMES).

llama.cpp's converter permutes the rows of Llama's q/k projections so that its rope rotates
adjacent pairs; HF's rotates halves. The permutation moves whole rows, so undoing it works on
rows of blocks as well as on floats. Llama 3.1-style rope scaling, which the converter stores
as per-frequency factors (rope_freqs.weight), is turned back into HF's "llama3" parameters.
"""

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaxlm.errors import RelaxlmError

from .checkpoint import Checkpoint

log = logging.getLogger(__name__)

# GGUF general.architecture -> the HF architecture whose model class computes it.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # also Mistral 7B, which llama.cpp stores as "llama"
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Architectures whose q/k rows llama.cpp's converter permutes (its NORM rope style).
_PERMUTED_QK = {"llama"}

# GGML tensor types read as arrays, and those kept as raw blocks (compiler's GGUF_SCHEMES).
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name -> HF parameter name ({i}: the layer).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for tensors no model class reads."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.match(gguf_name)
    if m is None or m[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file, as the graph sees it ([N, K] floats) and as it is stored."""

    index: int  # in GGUFReader.tensors
    ggml_type: str  # "F32", "Q4_K", ...
    shape: tuple[int, ...]  # HF order (rows first), in values
    dtype: np.dtype  # of the values (float32 for block types)
    permute_heads: int = 0  # > 0: undo llama.cpp's q/k row permutation over this many heads


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A .gguf file presented as a checkpoint: synthesized config.json, HF-named tensors."""

    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    reader: Any = field(default=None, repr=False)
    _scratch: Any = field(default=None, repr=False)

    @property
    def weight_files(self) -> list[Path]:
        return [self.path]

    @property
    def stored_types(self) -> dict[str, str]:
        """HF parameter name -> GGML type of its tensor in the file."""
        return {name: info.ggml_type for name, info in self.tensors.items()}

    @property
    def tokenizer_files(self) -> list[Path]:
        """tokenizer.json, tokenizer_config.json, generation_config.json rebuilt from metadata."""
        from .gguf_tokenizer import write_tokenizer

        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="relaxlm-gguf-tokenizer-")
            write_tokenizer(self.metadata, Path(self._scratch.name))
        return sorted(Path(self._scratch.name).iterdir())

    def read(self, name: str) -> np.ndarray:
        """Float tensors as arrays; block types as raw rows uint8 [N, K / B * bytes]."""
        info = self.tensors[name]
        data = self.reader.tensors[info.index].data  # memory-mapped, rows first
        if info.ggml_type == "BF16":
            import ml_dtypes

            data = data.view(ml_dtypes.bfloat16)
        rows = info.shape[0]
        data = data.reshape(rows, -1) if len(info.shape) == 2 else data.reshape(info.shape)
        if info.permute_heads:
            data = unpermute_rows(data, info.permute_heads)
        return data


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, interleaved pairs -> rotate-half rows."""
    rows = w.shape[0]
    # [heads, rows / heads / 2, 2, ...] -> [heads, 2, rows / heads / 2, ...]
    split = w.reshape(heads, rows // heads // 2, 2, *w.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(w.shape))


def load_gguf(path: Path) -> GGUFCheckpoint:
    """Open a GGUF file: metadata, HF config and tensor index; reads no tensor data."""
    try:
        import gguf
    except ImportError as e:
        raise RelaxlmError(
            f"{path}: reading GGUF files needs the gguf package: pip install gguf"
        ) from e
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise RelaxlmError(f"{path}: not a readable GGUF file ({e})") from e
    metadata = read_metadata(reader)
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise RelaxlmError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            + ", ".join(sorted(GGUF_ARCHITECTURES))
        )
    tensors = _index_tensors(path, reader, metadata, arch)
    rope_freqs = next((t.data for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    try:
        config = hf_config(metadata, tensors, rope_freqs)
    except RelaxlmError as e:
        raise RelaxlmError(f"{path}: {e}") from e
    return GGUFCheckpoint(
        path=path, config=config, tensors=tensors, metadata=metadata, reader=reader
    )


def read_metadata(reader) -> dict[str, Any]:
    """Every key-value pair of the file, as Python values (arrays as lists)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = f.contents()
    return out


def _index_tensors(path: Path, reader, metadata: dict, arch: str) -> dict[str, GGUFTensor]:
    heads = int(metadata[f"{arch}.attention.head_count"])
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    unsupported, unmapped = [], []
    tensors: dict[str, GGUFTensor] = {}
    for i, t in enumerate(reader.tensors):
        ggml_type = t.tensor_type.name
        name = hf_name(t.name)
        if name is None:
            unmapped.append(t.name)
            continue
        if ggml_type not in FLOAT_TYPES + BLOCK_TYPES:
            unsupported.append(f"{t.name} ({ggml_type})")
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (K) first
        dtype = {"F16": np.dtype("float16"), "BF16": _bf16()}.get(ggml_type, np.dtype("float32"))
        permute = 0
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = heads
        elif arch in _PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = int(kv_heads)
        tensors[name] = GGUFTensor(i, ggml_type, shape, dtype, permute)
    if unsupported:
        raise RelaxlmError(
            f"{path}: GGUF tensor type not supported: {', '.join(unsupported[:8])}"
            + (f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else "")
            + f"; relaxlm reads {', '.join(FLOAT_TYPES + BLOCK_TYPES)} (requantize the model "
            "with llama.cpp's quantize tool, e.g. to Q4_K_M)"
        )
    unmapped = [name for name in unmapped if name != "rope_freqs.weight"]  # read by hf_config
    if unmapped:
        log.warning("%s: %d GGUF tensors are not used: %s", path, len(unmapped), unmapped[:10])
    return tensors


def _bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def hf_config(
    metadata: dict[str, Any], tensors: dict[str, GGUFTensor], rope_freqs: np.ndarray | None = None
) -> dict[str, Any]:
    """config.json for the model class, from the GGUF metadata (llama.cpp's key names).

    rope_freqs: the file's rope_freqs.weight (Llama 3.1-style rope scaling), if any.
    """
    arch = metadata["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise RelaxlmError(f"GGUF metadata lacks {arch}.{name}")
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise RelaxlmError(f"GGUF {arch}.{name} differs per layer ({value}); not supported")
            value = value[0]
        return value

    if metadata.get(f"{arch}.expert_count"):
        raise RelaxlmError(f"GGUF {arch} with experts (mixture of experts) is not supported yet")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise RelaxlmError(
            f"GGUF {arch}.rope.dimension_count {rotary} != head dim {head_dim}: partial rotary "
            "embeddings are not supported for this architecture"
        )
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise RelaxlmError("GGUF file has no token_embd.weight")
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "lm_head.weight" not in tensors,
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(key("rope.scaling.factor")),
        }
    elif scaling != "none":
        raise RelaxlmError(f"GGUF {arch}.rope.scaling.type {scaling!r} is not supported yet")
    if rope_freqs is not None:
        if "rope_scaling" in config:
            raise RelaxlmError("GGUF has both rope_freqs.weight and rope.scaling; not supported")
        config["rope_scaling"] = llama3_rope(np.asarray(rope_freqs), config["rope_theta"], rotary)
    if "model.layers.0.self_attn.q_proj.bias" in tensors and arch == "llama":
        config["attention_bias"] = True
    for name in ("bos", "eos"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def llama3_rope(factors: np.ndarray, theta: float, rotary_dim: int) -> dict[str, Any]:
    """HF's "llama3" rope parameters that give llama.cpp's per-frequency factors (rope_freqs).

    llama.cpp's converter stores factor f(w) per frequency (w its wavelength): 1 below
    old / high, `factor` above old / low, and in between 1 / ((1 - s) / factor + s) with
    s = (old / w - low) / (high - low) = a / w - b, linear in 1 / w. Two or more points in
    between give a and b, and with low = 1: old = a / b, high = 1 + 1 / b (the thresholds
    and s depend on a and b alone, so any (old, low, high) with the same a, b is the same rope).
    """
    factors = factors.astype(np.float64).reshape(-1)
    wavelen = 2 * np.pi * theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    if factors.shape != wavelen.shape:
        raise RelaxlmError(f"rope_freqs.weight has {factors.size} factors, expected {wavelen.size}")
    factor = float(factors.max())
    between = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or between.sum() < 2:
        raise RelaxlmError(
            "rope_freqs.weight does not determine Llama 3 rope scaling (fewer than two "
            "frequencies between the scaled and unscaled ones); not supported"
        )
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    a, minus_b = np.polyfit(1 / wavelen[between], smooth, 1)
    b = -minus_b
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(1 + 1 / b),
        "original_max_position_embeddings": float(a / b),
    }
    if np.abs(llama3_factors(params, wavelen) / factors - 1).max() > 1e-4:
        raise RelaxlmError("rope_freqs.weight is not Llama 3 rope scaling; not supported")
    return params


def llama3_factors(params: dict[str, Any], wavelen: np.ndarray) -> np.ndarray:
    """Per-frequency factors of HF's llama3 rope (as llama.cpp's converter writes them)."""
    old, factor = params["original_max_position_embeddings"], params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    smooth = (old / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, between))

"""Write a Llama-family Hugging Face checkpoint as a GGUF file llama.cpp loads.

For benchmarks and oracles: tensors in F32 or F16 under llama.cpp's names, with q/k rows
permuted the way llama.cpp's own converter does for Llama (its rope pairs adjacent dimensions,
Hugging Face's pairs halves). Qwen2 checkpoints are written as llama.cpp's "qwen2" (no
permutation: its rope pairs halves as HF's does; q/k/v biases). The vocabulary is a
placeholder of the model's size (tokens are fed as ids).

    python -m relaxlm.testing.llama_gguf HF_DIR OUT.gguf [--ftype F16]
    then llama_cpp.llama_model_quantize for Q8_0 / Q4_0 / K-quants (see quantize_gguf)
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
from safetensors import safe_open

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved pairs, per head."""
    out, inp = w.shape
    return w.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _llama3_factors(rope: dict, theta: float, dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for HF's llama3 rope (its conversion/llama.py)."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_llama_gguf(hf_dir: str | Path, out: str | Path, ftype: str = "F16") -> Path:
    import gguf

    hf_dir, out = Path(hf_dir), Path(out)
    config = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    vocab = config["vocab_size"]
    arch = {"Qwen2ForCausalLM": "qwen2"}.get(config["architectures"][0], "llama")

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if ftype == "F16" else gguf.LlamaFileType.ALL_F32
    )
    # A placeholder SentencePiece vocabulary of the model's size.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(len(tokens), vocab)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens[:vocab])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types[:vocab])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    if rope.get("rope_type") == "llama3":  # as llama.cpp's converter: factors per frequency
        writer.add_tensor("rope_freqs.weight", _llama3_factors(rope, float(theta), head_dim))

    files = sorted(hf_dir.glob("*.safetensors"))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                w = f.get_tensor(name).float().numpy()
                if arch == "llama" and name.endswith("q_proj.weight"):
                    w = _permute_rope(w, heads)
                elif arch == "llama" and name.endswith("k_proj.weight"):
                    w = _permute_rope(w, kv_heads)
                # llama.cpp keeps norms in F32 whatever the file type
                dtype = np.float16 if ftype == "F16" and w.ndim == 2 else np.float32
                writer.add_tensor(_gguf_name(name), w.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize_gguf(src: str | Path, out: str | Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (the code behind its quantize tool): Q8_0, Q4_0, Q4_K_M, ..."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")
    return Path(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--ftype", default="F16", choices=["F16", "F32"])
    args = ap.parse_args()
    print(write_llama_gguf(args.hf_dir, args.out, args.ftype))


if __name__ == "__main__":
    main()

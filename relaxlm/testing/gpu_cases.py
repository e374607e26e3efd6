"""One tiny random-weight configuration per architecture, for the GPU checks: the CUDA compile
matrix (tests/test_cuda_matrix.py) and `scripts/gpu_check.py` build their checkpoints from here.

Wider than the CPU tests' TINY_CONFIG on purpose: every fixed matmul dimension is above 64, so
dlight's float16 tensor-core branch is reached (the H200 segfault hid below that), and the
Llama case is the llama3-RoPE, tied, hidden-256 shape that broke TVM's TIR CSE.

    from relaxlm.testing.gpu_cases import GPU_CASES, make_case
    folder = make_case(tmp_path / "qwen3", "qwen3")
"""

from __future__ import annotations

from pathlib import Path

from .tiny_models import make_model

DTYPES = ("float32", "float16", "bfloat16")
QUANTS = ("none", "q8", "q4", "q4-asym")
CUDA_TARGET = "cuda:sm_80,sm_90"

GPU_CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# make_model keyword arguments (base_config GPU_CONFIG), one case per architecture the GPU
# path compiles.
GPU_CASES: dict[str, dict] = {
    "llama": {
        "arch": "LlamaForCausalLM",
        "seed": 3,
        "tokenizer": "bpe",
        "hidden_size": 256,
        "intermediate_size": 512,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
    },
    # MQA with head_dim 64: the Mistral shape whose float16 build failed on the H200.
    "mistral": {
        "arch": "MistralForCausalLM",
        "seed": 5,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "qwen2": {
        "arch": "Qwen2ForCausalLM",
        "seed": 6,
        "tokenizer": "bpe",
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
    "mixtral": {
        "arch": "MixtralForCausalLM",
        "seed": 20,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen3_moe": {
        "arch": "Qwen3MoeForCausalLM",
        "seed": 21,
        "tokenizer": "bpe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 96,
        "norm_topk_prob": True,
    },
    "qwen3": {"arch": "Qwen3ForCausalLM", "seed": 30, "tokenizer": "bpe", "attention_bias": True},
    # head_dim 32, half of it rotated, LongRoPE (rotated in the graph, not by the cache).
    "phi3": {
        "arch": "Phi3ForCausalLM",
        "seed": 33,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 32,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 1.9, 2.0],
            "long_factor": [1.2, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
        },
    },
    "phi": {"arch": "PhiForCausalLM", "seed": 13, "qk_layernorm": True},
    "gpt2": {"arch": "GPT2LMHeadModel", "seed": 37, "tokenizer": "bpe"},
    # Sliding windows on every layer and soft-capped scores and logits: relaxlm's GPU attention
    # kernels, not TVM's.
    "gemma2": {
        "arch": "Gemma2ForCausalLM",
        "seed": 35,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "attn_logit_softcapping": 3.0,
        "final_logit_softcapping": 12.0,
    },
    # Windows on some layers: the cache's per-layer sliding-window page tables.
    "gemma3": {
        "arch": "Gemma3ForCausalLM",
        "seed": 37,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    # head_dim 24: TVM's decode kernel would ask for 6x1x85-thread blocks (CUDA's z is at most
    # 64), so the cache gets relaxlm's GPU attention kernels.
    "phi3_head_dim_24": {
        "arch": "Phi3ForCausalLM",
        "seed": 34,
        "hidden_size": 96,
        "head_dim": 24,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 192,
    },
}


# Vision-language cases: built by tiny_vlm's maker of their architecture, compiled to CUDA
# source in three cells (one per dtype, each with another quantization); not in gpu_check's run
# matrix.
VISION_CASES: dict[str, dict] = {
    "llava": {
        "arch": "LlavaForConditionalGeneration",
        "seed": 40,
        "text_overrides": GPU_CONFIG,
        "vision_overrides": {"hidden_size": 128, "intermediate_size": 256},
    },
    "qwen2_5_vl": {
        "arch": "Qwen2_5_VLForConditionalGeneration",
        "seed": 41,
        "vision_overrides": {"hidden_size": 128, "intermediate_size": 256},
    },
    # relaxlm's GPU attention kernels, with the bidirectional image-block entry
    "gemma3_vl": {"arch": "Gemma3ForConditionalGeneration", "seed": 42},
}
VISION_CELLS = (("float32", "none"), ("float16", "q4"), ("bfloat16", "q8"))

# Quantized KV caches (--kv-cache-dtype), CUDA source only: (case, dtype, quant, kv cache).
# Llama's full attention and Gemma 3's per-layer windows (the sliding-window kernels) between
# them build every attention kernel, the pack/unpack kernels and the merge over packed rows.
KV_CACHE_CELLS = (("llama", "float16", "q4", "int8"), ("gemma3", "bfloat16", "none", "fp8"))


# Diffusers pipelines: built by tiny_diffusion, every component (text encoders, denoiser, VAE
# decoder) compiled by compiler/diffusion.py in each cell; the float16 cell also through nvcc.
DIFFUSION_CASES = ("stable_diffusion", "flux")
DIFFUSION_CELLS = (("float32", "q4"), ("float16", "none"), ("bfloat16", "q8"))
DIFFUSION_NVCC_CELL = ("float16", "none")


# GGUF files: a GPU case written by relaxlm.testing.llama_gguf and quantized by llama.cpp's own
# quantizer, compiled with its blocks kept (quant none), in every dtype.
GGUF_CASES: dict[str, tuple[str, str]] = {
    "llama_gguf_q4_0": ("llama", "Q4_0"),
    "llama_gguf_q4_1": ("llama", "Q4_1"),
    "qwen2_gguf_q8_0": ("qwen2", "Q8_0"),
}


def case_kwargs(case: str) -> dict:
    """make_model keyword arguments of a GPU case."""
    return {"base_config": GPU_CONFIG, **GPU_CASES[case]}


def make_case(out_dir: str | Path, case: str) -> Path:
    """The tiny random-weight checkpoint of `case` (a GPU, GGUF, vision or diffusion case),
    saved to `out_dir`; its path (a folder, or a GGUF file in `out_dir`)."""
    if case in GGUF_CASES:
        from .llama_gguf import quantize_gguf, write_llama_gguf

        base, ftype = GGUF_CASES[case]
        out_dir = Path(out_dir)
        f16 = write_llama_gguf(make_case(out_dir / base, base), out_dir / "f16.gguf")
        return quantize_gguf(f16, out_dir / f"{ftype}.gguf", ftype)
    if case in DIFFUSION_CASES:
        from . import tiny_diffusion

        if case == "flux":
            tiny_diffusion.tiny_flux(Path(out_dir))
            return Path(out_dir) / "flux"
        tiny_diffusion.tiny_stable_diffusion(Path(out_dir))
        return Path(out_dir) / "sd"
    if case in VISION_CASES:
        from .tiny_vlm import make_gemma3_vl_model, make_llava_model, make_qwen2_5_vl_model

        kwargs = {k: v for k, v in VISION_CASES[case].items() if k != "arch"}
        if VISION_CASES[case]["arch"].startswith("Qwen2_5_VL"):
            return make_qwen2_5_vl_model(out_dir, **kwargs)
        if VISION_CASES[case]["arch"].startswith("Gemma3"):
            return make_gemma3_vl_model(out_dir, **kwargs)
        return make_llava_model(out_dir, **kwargs)
    return make_model(out_dir, **case_kwargs(case))

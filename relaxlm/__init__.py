"""relaxlm: ahead-of-time compiled LLM inference on Apache TVM Relax."""

import os
from pathlib import Path

from ._version import __version__ as __version__

# The SDK names resolve on first use, so that `import relaxlm.runtime` (an embedded
# deployment) loads only the runtime, and submodules import without cycles.
_LAZY = {
    "LLM": "relaxlm.sdk",
    "AsyncLLM": "relaxlm.sdk",
    "EmbeddingLLM": "relaxlm.sdk",
    "GenerationResult": "relaxlm.sdk",
    "SamplingParams": "relaxlm.runtime.sampler",
    "RelaxlmError": "relaxlm.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'relaxlm' has no attribute {name!r}")


def compile(  # shadows the builtin on purpose: the SDK's name for it
    model: str | os.PathLike,
    *,
    output: str | os.PathLike,
    target: str | list[str] = "cpu",
    quant: str = "none",
    dtype: str = "float32",
    progress: bool = True,
    add: bool = False,
    force: bool = False,
    lora: list[str | os.PathLike] = (),
    device_map: str | None = None,
    gpu_layers: int | None = None,
    lora_slots: int = 0,
    lora_max_rank: int = 16,
    lora_targets: list[str] | None = None,
    tensor_parallel: int = 1,
    kv_cache_dtype: str = "auto",
    cuda_graph: bool = False,
    gemm: str = "tir",
) -> Path:
    """Compile a checkpoint into an artifact folder; returns its path.

    target: one preset or several (`"cuda:sm_80,sm_90,metal"` or a list), one library each;
    add: add them to the artifact already at `output` (same weights), keeping its libraries.
    force: replace an artifact of another checkpoint at `output` (one of the same checkpoint
        is always replaced: a recompile).
    lora: PEFT LoRA adapter folders (save_pretrained's) merged into the weights, in order.
    device_map: decoder layers per device (`"cuda:0:0-23,cpu:24-31"`), one library per stage;
    gpu_layers: the last N layers on the GPU, the rest on the CPU (llama.cpp's `-ngl`).
    lora_slots: K adapter slots of rank <= lora_max_rank on the layers lora_targets names
        (None: every linear layer but the logits head), for adapters loaded at run time.
    tensor_parallel: N shards (attention heads and MLP columns split, an all-reduce after
        each attention and MLP), run by TVM Disco; Llama, Mistral and Qwen2.
    kv_cache_dtype: what the KV cache's pages hold: auto (the model's dtype), float16, or
        int8 / fp8 codes with a float16 scale per token and kv head (CPU targets).
    cuda_graph: CUDA targets replay decode's kernels as CUDA graphs (compiler/cuda_graph.py);
        off by default until a GPU run shows it correct.
    gemm: "library" hands prefill's GEMMs to cuBLAS on CUDA (`pip install 'relaxlm[cuda]'`;
        tensor cores) or numpy's BLAS on CPUs (float32); "tir" (default) keeps TVM's kernels.
    """
    from relaxlm.compiler.pipeline import compile_model  # compiler code only when compiling

    if not (add or force):
        _refuse_to_replace_another_model(model, Path(output))
    return compile_model(
        model,
        output,
        target=target,
        quant=quant,
        dtype=dtype,
        progress=progress,
        add=add,
        lora=lora,
        device_map=device_map,
        gpu_layers=gpu_layers,
        lora_slots=lora_slots,
        lora_max_rank=lora_max_rank,
        lora_targets=lora_targets,
        tensor_parallel=tensor_parallel,
        kv_cache_dtype=kv_cache_dtype,
        cuda_graph=cuda_graph,
        gemm=gemm,
    )


def _refuse_to_replace_another_model(model: str | os.PathLike, output: Path) -> None:
    """Stop before compiling when `output` holds an artifact of another checkpoint."""
    from relaxlm.artifacts import Manifest, is_artifact
    from relaxlm.errors import RelaxlmError
    from relaxlm.frontends.checkpoint import resolve_model_path

    if not is_artifact(output):
        return
    try:
        existing = Manifest.read(output).source.get("path")
    except RelaxlmError:
        existing = None  # a damaged artifact is replaced only on request too
    new = resolve_model_path(model).resolve()
    if existing is None or Path(existing).resolve() != new:
        raise RelaxlmError(
            f"{output} holds an artifact of another model ({existing or 'unreadable manifest'}); "
            f"pass --force (force=True) to replace it with {new}, or choose another -o folder"
        )


__all__ = [
    "LLM",
    "AsyncLLM",
    "EmbeddingLLM",
    "GenerationResult",
    "RelaxlmError",
    "SamplingParams",
    "compile",
]

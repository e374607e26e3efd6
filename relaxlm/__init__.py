"""relaxlm: ahead-of-time compiled LLM inference on Apache TVM Relax."""

import os
from pathlib import Path

__version__ = "0.1.0"

# The SDK names resolve on first use, so that `import relaxlm.runtime` (an embedded
# deployment) loads only the runtime, and submodules import without cycles.
_LAZY = {
    "LLM": "relaxlm.sdk",
    "AsyncLLM": "relaxlm.sdk",
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
) -> Path:
    """Compile a checkpoint into an artifact folder; returns its path.

    target: one preset or several (`"cuda:sm_80,sm_90,metal"` or a list), one library each;
    add: add them to the artifact already at `output` (same weights), keeping its libraries.
    """
    from relaxlm.compiler.pipeline import compile_model  # compiler code only when compiling

    return compile_model(
        model, output, target=target, quant=quant, dtype=dtype, progress=progress, add=add
    )


__all__ = ["LLM", "AsyncLLM", "GenerationResult", "RelaxlmError", "SamplingParams", "compile"]

"""Frontends: checkpoints in, one Relax IRModule plus named weights out."""

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import IRModule

from relaxlm.errors import RelaxlmError

from . import llama
from .checkpoint import Checkpoint, load_checkpoint
from .entry import export_causal_lm

# architecture name in config.json -> (config reader, model class)
ARCHITECTURES = {
    "LlamaForCausalLM": (llama.LlamaConfig.from_dict, llama.LlamaForCausalLM),
    "MistralForCausalLM": (llama.LlamaConfig.from_dict, llama.LlamaForCausalLM),
    "Qwen2ForCausalLM": (llama.qwen2_config, llama.LlamaForCausalLM),
}

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


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


def export(checkpoint: Checkpoint, dtype: str = "float32") -> ExportedModel:
    """Build the architecture's graph for `checkpoint` with weights in `dtype`."""
    if dtype not in DTYPES:
        raise RelaxlmError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    arch = checkpoint.architecture
    if arch not in ARCHITECTURES:
        raise RelaxlmError(
            f"architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    read_config, model_class = ARCHITECTURES[arch]
    try:
        config = read_config(checkpoint.config)
    except KeyError as e:
        raise RelaxlmError(f"{checkpoint.path / 'config.json'}: missing key {e}") from e
    model = model_class(config)
    model.to(dtype)
    mod, named_params = export_causal_lm(model)
    shapes = {name: tuple(int(d) for d in p.shape) for name, p in named_params}
    _check_weights(checkpoint, shapes)
    return ExportedModel(
        mod=mod,
        param_names=[name for name, _ in named_params],
        param_shapes=shapes,
        dtype=dtype,
        architecture=arch,
        config=checkpoint.config,
        context_window=config.context_window,
        vocab_size=config.vocab_size,
    )


def _check_weights(checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every graph parameter present with its shape; unused checkpoint tensors only warned."""
    missing = [n for n in shapes if n not in checkpoint.tensors]
    if missing:
        raise RelaxlmError(
            f"{checkpoint.path}: checkpoint lacks {len(missing)} weights the model needs: "
            + ", ".join(missing)
        )
    wrong = [
        f"{n} is {checkpoint.tensors[n].shape}, expected {s}"
        for n, s in shapes.items()
        if checkpoint.tensors[n].shape != s
    ]
    if wrong:
        raise RelaxlmError(
            f"{checkpoint.path}: weight shapes differ from config.json: " + "; ".join(wrong)
        )
    unused = sorted(set(checkpoint.tensors) - set(shapes))
    if unused:
        log.warning("%d checkpoint tensors are not used: %s", len(unused), ", ".join(unused[:10]))
    for name in shapes:
        kind = np.dtype(checkpoint.tensors[name].dtype).kind
        if kind not in "fV":  # V: bfloat16 via ml_dtypes
            raise RelaxlmError(f"{checkpoint.path}: weight {name} has non-float dtype")


__all__ = ["ARCHITECTURES", "Checkpoint", "ExportedModel", "export", "load_checkpoint"]

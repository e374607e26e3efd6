"""Frontends: checkpoints in, one Relax IRModule plus named weights out."""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from relaxlm.errors import RelaxlmError

from . import (
    gemma2,
    gemma3,
    gemma3_vl,
    gpt2,
    llama,
    llava,
    llava_next,
    mixtral,
    phi,
    phi3,
    qwen2_vl,
    qwen3,
    qwen3_moe,
    vits,
    whisper,
)
from .checkpoint import Checkpoint, load_hf_checkpoint, resolve_model_path
from .embedding import ENCODERS, embedding_model
from .entry import (
    ExportedModel,
    SpeechSeq2Seq,
    VisionLM,
    can_split,
    export_causal_lm,
    export_causal_lm_stage,
    export_embedding,
    export_speech_seq2seq,
    export_vision_lm,
)
from .gguf import load_gguf
from .lora_slots import LoraSlotsSpec, export_with_slots, with_slot_weights
from .onnx import OnnxCheckpoint, export_onnx, load_onnx
from .prequantized import prequantized

# architecture name in config.json -> (config reader, model class)
ARCHITECTURES = {
    "LlamaForCausalLM": (llama.LlamaConfig.from_dict, llama.LlamaForCausalLM),
    "MistralForCausalLM": (llama.LlamaConfig.from_dict, llama.LlamaForCausalLM),
    "Qwen2ForCausalLM": (llama.qwen2_config, llama.LlamaForCausalLM),
    "MixtralForCausalLM": (mixtral.MixtralConfig.from_dict, mixtral.MixtralForCausalLM),
    "Qwen3MoeForCausalLM": (qwen3_moe.Qwen3MoeConfig.from_dict, qwen3_moe.Qwen3MoeForCausalLM),
    "Qwen3ForCausalLM": (llama.LlamaConfig.from_dict, qwen3.Qwen3ForCausalLM),
    "Phi3ForCausalLM": (phi3.Phi3Config.from_dict, phi3.Phi3ForCausalLM),
    "PhiForCausalLM": (phi.PhiConfig.from_dict, phi.PhiForCausalLM),
    "Gemma2ForCausalLM": (gemma2.Gemma2Config.from_dict, gemma2.Gemma2ForCausalLM),
    "Gemma3ForCausalLM": (gemma3.Gemma3Config.from_dict, gemma3.Gemma3ForCausalLM),
    "Gemma3ForConditionalGeneration": (
        gemma3_vl.Gemma3VLConfig.from_dict,
        gemma3_vl.Gemma3ForConditionalGeneration,
    ),
    "GPT2LMHeadModel": (gpt2.GPT2Config.from_dict, gpt2.GPT2LMHeadModel),
    "LlavaForConditionalGeneration": (
        llava.LlavaConfig.from_dict,
        llava.LlavaForConditionalGeneration,
    ),
    "LlavaNextForConditionalGeneration": (
        llava_next.LlavaNextConfig.from_dict,
        llava_next.LlavaNextForConditionalGeneration,
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        qwen2_vl.Qwen2_5_VLConfig.from_dict,
        qwen2_vl.Qwen2_5_VLForConditionalGeneration,
    ),
    "Qwen2VLForConditionalGeneration": (
        qwen2_vl.Qwen2VLConfig.from_dict,
        qwen2_vl.Qwen2VLForConditionalGeneration,
    ),
    "WhisperForConditionalGeneration": (
        whisper.WhisperConfig.from_dict,
        whisper.WhisperForConditionalGeneration,
    ),
    "VitsModel": (vits.VitsConfig.from_dict, vits.VitsModel),
}

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def load_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Open a Hugging Face checkpoint (or a GGUF or ONNX file) and index its tensors."""
    path = resolve_model_path(source)
    if path.suffix == ".onnx":  # an ONNX graph; tokenizer and pooling from its folder
        return load_onnx(path)
    if path.is_file():  # a .gguf file: config, tensors and tokenizer all come from it
        return load_gguf(path)
    return prequantized(load_hf_checkpoint(path))


def export(
    checkpoint: Checkpoint, dtype: str = "float32", lora_slots: LoraSlotsSpec | None = None
) -> ExportedModel:
    """Build the architecture's graph for `checkpoint` with weights in `dtype`.

    lora_slots: also adapter slots on its linear layers (frontends/lora_slots.py); their
        weights are zeros the checkpoint lacks (`with_slot_weights` reads them).
    """
    if dtype not in DTYPES:
        raise RelaxlmError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(checkpoint, OnnxCheckpoint):  # a graph that brings its own ops and weights
        if lora_slots is not None:
            raise RelaxlmError("LoRA slots cannot be added to an ONNX graph; use the checkpoint")
        return export_onnx(checkpoint, dtype)
    try:
        model, facts = _build_model(checkpoint)
    except KeyError as e:
        raise RelaxlmError(f"{checkpoint.path / 'config.json'}: missing key {e}") from e
    model.to(dtype)
    embeds = facts.get("task") == "embed"
    slots = {}
    if lora_slots is not None:
        if embeds:
            raise RelaxlmError("LoRA slots are for text decoder models, not embedding models")
        mod, named_params, slots = export_with_slots(model, lora_slots, dtype)
    elif embeds:
        mod, named_params = export_embedding(model)
    elif isinstance(model, VisionLM):
        mod, named_params = export_vision_lm(model)
    elif isinstance(model, SpeechSeq2Seq):
        mod, named_params = export_speech_seq2seq(model)
    elif isinstance(model, vits.VitsModel):
        mod, named_params = vits.export_vits(model)
    else:
        mod, named_params = export_causal_lm(model)
    shapes = {name: tuple(int(d) for d in p.shape) for name, p in named_params}
    _check_weights(with_slot_weights(checkpoint, shapes) if slots else checkpoint, shapes)
    return ExportedModel(
        mod=mod,
        param_names=[name for name, _ in named_params],
        param_shapes=shapes,
        dtype=dtype,
        architecture=checkpoint.architecture,
        config=checkpoint.config,
        lora_slots=slots,
        **facts,
    )


@dataclass
class SplitModel:
    """A text model whose decoder layers are exported in ranges, one per pipeline stage."""

    checkpoint: Checkpoint
    model: Any
    facts: dict[str, Any]
    dtype: str

    @property
    def num_layers(self) -> int:
        return len(self.model.decoder_layers())

    def export(self, first: int, end: int) -> ExportedModel:
        """Decoder layers [first, end) as `prefill` / `decode` (see export_causal_lm_stage)."""
        hidden = self.model.config.hidden_size
        mod, named_params = export_causal_lm_stage(self.model, first, end, hidden, self.dtype)
        return ExportedModel(
            mod=mod,
            param_names=[name for name, _ in named_params],
            param_shapes={name: tuple(int(d) for d in p.shape) for name, p in named_params},
            dtype=self.dtype,
            architecture=self.checkpoint.architecture,
            config=self.checkpoint.config,
            layers=(first, end, self.num_layers),
            **self.facts,
        )


def split(checkpoint: Checkpoint, dtype: str = "float32") -> SplitModel:
    """The checkpoint's model, to be exported in layer ranges; RelaxlmError for a model that
    cannot be split (not a decoder text model of a family that gives its parts)."""
    if dtype not in DTYPES:
        raise RelaxlmError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(checkpoint, OnnxCheckpoint):
        raise RelaxlmError("an ONNX graph cannot be split across devices; use a checkpoint folder")
    try:
        model, facts = _build_model(checkpoint)
    except KeyError as e:
        raise RelaxlmError(f"{checkpoint.path / 'config.json'}: missing key {e}") from e
    if facts.get("task") == "embed" or not can_split(model):
        raise RelaxlmError(
            f"{checkpoint.architecture} cannot be split across devices (a device map): only "
            "decoder text models of the Llama family are (Llama, Mistral, Qwen2/3, Mixtral, "
            "Phi-3, Gemma 2/3); compile it for one device"
        )
    model.to(dtype)
    shapes = {name: tuple(int(d) for d in p.shape) for name, p in model.named_parameters()}
    _check_weights(checkpoint, shapes)
    return SplitModel(checkpoint, model, facts, dtype)


def _build_model(checkpoint: Checkpoint) -> tuple[Any, dict[str, Any]]:
    """The checkpoint's model, and the ExportedModel fields that describe it."""
    embedder = embedding_model(checkpoint, ARCHITECTURES)
    if embedder is not None:
        return embedder.model, {
            "context_window": embedder.context_window,
            "vocab_size": embedder.vocab_size,
            "task": "embed",
            "embedding": embedder.pooling.to_manifest(),
        }
    arch = checkpoint.architecture
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted([*ARCHITECTURES, *ENCODERS]))
        raise RelaxlmError(
            f"architecture {arch!r} is not supported; supported: {supported}, and the XModel "
            "trunk of each XForCausalLM as an embedding model"
        )
    read_config, model_class = ARCHITECTURES[arch]
    config = read_config(checkpoint.config)
    # A class whose parameter names vary across checkpoint layouts picks its tree by them.
    for_tensors = getattr(model_class, "for_tensors", None)
    model = for_tensors(config, checkpoint.tensors) if for_tensors else model_class(config)
    facts = {"context_window": config.context_window, "vocab_size": config.vocab_size}
    if isinstance(model, VisionLM):
        facts["vision"] = model.vision_manifest(_preprocessor_config(checkpoint))
    if isinstance(model, SpeechSeq2Seq):
        facts["task"] = "transcribe"
        facts["speech"] = model.speech_manifest(
            _preprocessor_config(checkpoint), _json_file(checkpoint.path / "generation_config.json")
        )
    if isinstance(model, vits.VitsModel):
        facts["task"] = "synthesize"
        facts["speech"] = model.speech_manifest(vits.vits_tokenizer(checkpoint.path))
    return model, facts


def _preprocessor_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's image processor settings (preprocessor_config.json), if it has them."""
    return _json_file(checkpoint.path / "preprocessor_config.json")


def _json_file(path) -> dict[str, Any] | None:
    """A checkpoint's optional JSON file, parsed; None when it is absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RelaxlmError(f"{path}: not valid JSON ({e})") from e


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


__all__ = [
    "ARCHITECTURES",
    "Checkpoint",
    "ExportedModel",
    "SplitModel",
    "export",
    "load_checkpoint",
    "split",
]

"""PEFT LoRA adapters, merged into a Hugging Face checkpoint's tensors as they are read.

An adapter is the folder PEFT's `save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named after the adapted module of the wrapped
model, `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. The
merge is PEFT's `merge_and_unload`: W += scale * (B @ A), transposed where the base stores the
weight [in, out] (`fan_in_fan_out`: GPT-2's Conv1D), scale = alpha / r (alpha / sqrt(r) with
`use_rslora`), r and alpha per module from `rank_pattern` / `alpha_pattern`. It happens on the
checkpoint's own tensor names, before a frontend reads them and before the compiler fuses
(q/k/v -> qkv) or quantizes anything, so every --quant works unchanged.
"""

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaxlm.artifacts import sha256_file
from relaxlm.artifacts.safetensors_io import TensorInfo, index_file, read
from relaxlm.errors import RelaxlmError

from .checkpoint import Checkpoint

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# `base_model.model.<module>.lora_A.weight`; lora_B may carry a bias (lora_bias=True).
_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_[AB])\.(?P<param>\w+)$"
)

# adapter_config.json fields that, when set, make the adapter something W += scale * B @ A does
# not reproduce (LoRA variants, extra trained tensors, copied layers).
_UNSUPPORTED = {
    "use_dora": "DoRA rescales each merged column by a learned magnitude",
    "use_qalora": "QA-LoRA pools the input in groups",
    "use_bdlora": "BD-LoRA shares blocks across modules",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "velora_config": "VeLoRA is a LoRA variant",
    "monteclora_config": "MonteCLoRA is a LoRA variant",
    "arrow_config": "Arrow routes among several adapters per token",
    "kasa_config": "KaSA is a LoRA variant",
    "modules_to_save": "it trains whole copies of modules, saved beside the LoRA matrices",
    "trainable_token_indices": "it trains rows of the embedding table",
    "target_parameters": "it adapts raw parameters (such as fused MoE experts), not modules",
    "layer_replication": "it duplicates layers of the base model",
}


@dataclass(frozen=True)
class LoraAdapter:
    """One PEFT LoRA adapter folder: its config and its tensors (read lazily)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(repr=False)
    sha256: str  # of adapter_model.safetensors

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """The module's r and lora_alpha: rank_pattern / alpha_pattern as PEFT matches them
        (the first key that is a dotted suffix of the module's name, as a regex), else the
        adapter's r and lora_alpha."""
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(
            self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"]
        )
        return r, alpha

    def scale(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def to_manifest(self) -> dict[str, Any]:
        """What the artifact's manifest records of the adapter."""
        out = {
            "path": str(self.path),
            "sha256": self.sha256,
            "r": self.config["r"],
            "alpha": self.config["lora_alpha"],
            "target_modules": self.config.get("target_modules"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "modules": len({_TENSOR.match(n)["module"] for n in self.tensors}),
        }
        for key in ("rank_pattern", "alpha_pattern", "base_model_name_or_path"):
            if self.config.get(key):
                out[key] = self.config[key]
        return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: str | os.PathLike) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder; RelaxlmError for what the merge cannot reproduce."""
    path = Path(folder).expanduser().resolve()
    config_path = path / CONFIG
    if not config_path.is_file():
        raise RelaxlmError(
            f"--lora {folder}: no {CONFIG}; pass the folder PEFT's save_pretrained wrote"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RelaxlmError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise RelaxlmError(f"{config_path}: a JSON {type(config).__name__}, not an object")
    if config.get("peft_type") != "LORA":
        raise RelaxlmError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; relaxlm merges LoRA "
            "adapters only (peft_type LORA)"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise RelaxlmError(f"{config_path}: {key} is {config.get(key)!r}, not a number > 0")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise RelaxlmError(
                f"{config_path}: {key} is set, which relaxlm cannot merge ({why}); merge the "
                "adapter with PEFT (merge_and_unload, then save_pretrained) and compile that model"
            )
    if config.get("bias", "none") != "none":
        raise RelaxlmError(
            f"{config_path}: bias is {config['bias']!r}: the adapter trains the base model's "
            "biases, which relaxlm does not merge; merge it with PEFT (merge_and_unload) and "
            "compile that model"
        )
    weights = path / WEIGHTS
    if not weights.is_file():
        old = " (adapter_model.bin is a pickle: save it with safe_serialization=True)"
        raise RelaxlmError(
            f"--lora {folder}: no {WEIGHTS}"
            + (old if (path / "adapter_model.bin").is_file() else "")
        )
    tensors = index_file(weights)
    if not tensors:
        raise RelaxlmError(f"{weights}: holds no tensors; the adapter is empty")
    for name in tensors:
        _check_tensor_name(weights, name)
    return LoraAdapter(path=path, config=config, tensors=tensors, sha256=sha256_file(weights))


def _check_tensor_name(file: Path, name: str) -> None:
    m = _TENSOR.match(name)
    if m and (m["param"] == "weight" or (m["kind"], m["param"]) == ("lora_B", "bias")):
        return
    if "lora_embedding_" in name:
        why = "LoRA on an embedding table is not supported"
    elif "lora_magnitude_vector" in name:
        why = "a DoRA magnitude vector; DoRA is not supported"
    else:
        why = "not a LoRA A or B matrix (a trained copy of a module or a bias is not merged)"
    raise RelaxlmError(
        f"{file}: tensor {name}: {why}; merge the adapter with PEFT (merge_and_unload, then "
        "save_pretrained) and compile that model"
    )


@dataclass(frozen=True)
class _Update:
    """What one adapter adds to one base tensor: scale * (B @ A) (transposed for [in, out]
    weights), or, for a bias (lora_bias=True), scale * lora_B.bias (`a` is None)."""

    a: TensorInfo | None
    b: TensorInfo
    scale: float
    transpose: bool = False

    def delta(self) -> np.ndarray:
        b = read(self.b).astype(np.float32)
        if self.a is None:
            return b * np.float32(self.scale)
        delta = (b @ read(self.a).astype(np.float32)) * np.float32(self.scale)  # [out, in]
        return delta.T if self.transpose else delta


@dataclass
class LoraCheckpoint(Checkpoint):
    """A Hugging Face checkpoint whose tensors read with LoRA adapters merged in."""

    merged: tuple[LoraAdapter, ...] = ()
    updates: dict[str, list[_Update]] = field(default_factory=dict, repr=False)

    @property
    def adapters(self) -> tuple[LoraAdapter, ...]:
        return self.merged

    def read(self, name: str) -> np.ndarray:
        """The tensor plus every adapter's update, summed in float32, in the tensor's dtype."""
        array = super().read(name)
        if name not in self.updates:
            return array
        merged = array.astype(np.float32)  # a copy: the base file is memory-mapped read-only
        for update in self.updates[name]:
            merged += update.delta()
        return merged.astype(array.dtype)


def merge_lora(checkpoint: Checkpoint, adapters: list[str | os.PathLike]) -> Checkpoint:
    """`checkpoint` with the LoRA adapters in these folders merged into its tensors, in order.

    Every adapter is checked against the base first (each module's weight exists, with the
    shape B @ A has); the merge itself happens as each tensor is read, one at a time.
    """
    if not adapters:
        return checkpoint
    if type(checkpoint) is not Checkpoint:  # a GGUF or ONNX file, or 4-bit AWQ/GPTQ layers
        kind = {".gguf": "a GGUF file", ".onnx": "an ONNX file"}.get(
            checkpoint.path.suffix, "an AWQ/GPTQ checkpoint of 4-bit weights"
        )
        raise RelaxlmError(
            f"--lora: {checkpoint.path} is {kind}; LoRA adapters merge into float Hugging Face "
            "safetensors checkpoints only: pass the adapter's base model folder (or repo id)"
        )
    opened = [read_adapter(a) for a in adapters]
    updates: dict[str, list[_Update]] = {}
    for adapter in opened:
        for name, update in _adapter_updates(adapter, checkpoint):
            updates.setdefault(name, []).append(update)
        _warn_if_made_for_another_base(adapter, checkpoint.path)
    return LoraCheckpoint(
        path=checkpoint.path,
        config=checkpoint.config,
        tensors=checkpoint.tensors,
        merged=tuple(opened),
        updates=updates,
    )


def _adapter_updates(adapter: LoraAdapter, checkpoint: Checkpoint) -> list[tuple[str, _Update]]:
    """(base tensor name, update) for each module the adapter adapts; checks shapes."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for name, info in adapter.tensors.items():
        m = _TENSOR.match(name)
        parts.setdefault(m["module"], {})[f"{m['kind']}.{m['param']}"] = info
    where = adapter.path / WEIGHTS
    transpose = bool(adapter.config.get("fan_in_fan_out"))
    out = []
    for module, tensors in sorted(parts.items()):
        a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if a is None or b is None:
            raise RelaxlmError(
                f"{where}: module {module} has {'lora_B' if a is None else 'lora_A'} but no "
                f"{'lora_A' if a is None else 'lora_B'} matrix; the file is incomplete"
            )
        r, _ = adapter.rank_and_alpha(module)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise RelaxlmError(
                f"{where}: module {module}: lora_A is {list(a.shape)} and lora_B "
                f"{list(b.shape)}, which is not [r, in] and [out, r] with r = {r} as "
                f"{CONFIG} says (r, rank_pattern)"
            )
        weight = _base_tensor(checkpoint, module, where)
        base = tuple(checkpoint.tensors[weight].shape)
        delta = (b.shape[0], a.shape[1])  # [out, in]
        want = delta[::-1] if transpose else delta
        if base != want:
            hint = (
                f"; fan_in_fan_out is {transpose}, and the transposed update would fit"
                if base == want[::-1]
                else ""
            )
            raise RelaxlmError(
                f"{where}: module {module}: the adapter's update B @ A is {list(want)} (lora_B "
                f"{list(b.shape)} @ lora_A {list(a.shape)}), but the base weight {weight} is "
                f"{list(base)}{hint}; was the adapter made for another base model?"
            )
        scale = adapter.scale(module)
        out.append((weight, _Update(a, b, scale, transpose)))
        if (bias := tensors.get("lora_B.bias")) is not None:
            name = weight.removesuffix(".weight") + ".bias"
            if name not in checkpoint.tensors:
                raise RelaxlmError(
                    f"{where}: module {module} has a lora_B bias (lora_bias), but the base "
                    f"model has no {name} to add it to"
                )
            if tuple(checkpoint.tensors[name].shape) != bias.shape:
                raise RelaxlmError(
                    f"{where}: module {module}: lora_B's bias is {list(bias.shape)}, but the "
                    f"base {name} is {list(checkpoint.tensors[name].shape)}"
                )
            out.append((name, _Update(None, bias, scale)))
    return out


def _base_tensor(checkpoint: Checkpoint, module: str, where: Path) -> str:
    """The checkpoint tensor `<module>.weight` names; adapters trained on the bare trunk
    (`layers.0...` for a `model.layers.0...` checkpoint), or the reverse, are matched too."""
    name = f"{module}.weight"
    if name in checkpoint.tensors:
        return name
    shorter = name.split(".", 1)[-1]
    if shorter in checkpoint.tensors:
        return shorter
    longer = [
        n
        for n in checkpoint.tensors
        if n.endswith(f".{name}") and n.count(".") == name.count(".") + 1
    ]
    if len(longer) == 1:
        return longer[0]
    raise RelaxlmError(
        f"{where}: the adapter adapts module {module}, but the base checkpoint "
        f"{checkpoint.path} has no weight {name}; was the adapter made for another base model?"
    )


def _warn_if_made_for_another_base(adapter: LoraAdapter, base: Path) -> None:
    recorded = adapter.config.get("base_model_name_or_path")
    if not recorded:
        return
    same = Path(recorded).expanduser().resolve() == base.resolve() or (
        # a hub repo id "owner/name" and its snapshot in huggingface_hub's cache
        f"models--{recorded.replace('/', '--')}" in base.parts or Path(recorded).name == base.name
    )
    if not same:
        log.warning(
            "LoRA adapter %s was made for %s, not %s; merging it all the same (the shapes fit)",
            adapter.path,
            recorded,
            base,
        )

"""PEFT LoRA adapter folders, read and checked: what the merged path (frontends/lora.py) and
the slot path (runtime/lora.py) share.

An adapter is the folder PEFT's `save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named after the adapted module of the wrapped
model, `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r];
scale = alpha / r (alpha / sqrt(r) with `use_rslora`), r and alpha per module from
`rank_pattern` / `alpha_pattern`.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaxlm.errors import RelaxlmError

from . import sha256_file
from .safetensors_io import TensorInfo, index_file

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
            f"{config_path}: peft_type is {config.get('peft_type')!r}; relaxlm reads LoRA "
            "adapters only (peft_type LORA)"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise RelaxlmError(f"{config_path}: {key} is {config.get(key)!r}, not a number > 0")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise RelaxlmError(
                f"{config_path}: {key} is set, which relaxlm cannot apply ({why}); merge the "
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
class ModuleUpdate:
    """One adapted module's tensors: lora_A [r, in], lora_B [out, r], lora_B's bias if any."""

    module: str
    a: TensorInfo
    b: TensorInfo
    bias: TensorInfo | None
    rank: int
    scale: float


def module_updates(adapter: LoraAdapter) -> list[ModuleUpdate]:
    """The adapter's modules, sorted by name; RelaxlmError for a missing or misshapen half."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for name, info in adapter.tensors.items():
        m = _TENSOR.match(name)
        parts.setdefault(m["module"], {})[f"{m['kind']}.{m['param']}"] = info
    where = adapter.path / WEIGHTS
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
        bias = tensors.get("lora_B.bias")
        out.append(ModuleUpdate(module, a, b, bias, r, adapter.scale(module)))
    return out

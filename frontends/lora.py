"""PEFT LoRA adapters, merged into a Hugging Face checkpoint's tensors as they are read.

Adapter folders are read by artifacts/peft_lora.py. The merge is PEFT's `merge_and_unload`:
W += scale * (B @ A), transposed where the base stores the weight [in, out] (`fan_in_fan_out`:
GPT-2's Conv1D), scale = alpha / r (alpha / sqrt(r) with `use_rslora`), r and alpha per module
from `rank_pattern` / `alpha_pattern`. It happens on the checkpoint's own tensor names, before
a frontend reads them and before the compiler fuses (q/k/v -> qkv) or quantizes anything, so
every --quant works unchanged.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from relaxlm.artifacts.peft_lora import WEIGHTS, LoraAdapter, module_updates, read_adapter
from relaxlm.artifacts.safetensors_io import TensorInfo, read
from relaxlm.errors import RelaxlmError

from .checkpoint import Checkpoint

log = logging.getLogger(__name__)


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
    where = adapter.path / WEIGHTS
    transpose = bool(adapter.config.get("fan_in_fan_out"))
    out = []
    for m in module_updates(adapter):
        module, a, b = m.module, m.a, m.b
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
        scale = m.scale
        out.append((weight, _Update(a, b, scale, transpose)))
        if (bias := m.bias) is not None:
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

"""LoRA adapter slots: a base model compiled to apply any of K adapters, unmerged, per sequence.

Each targeted linear layer gets two more weights, the adapters' matrices stacked by slot:
`<module>.lora_A` [in, K, R] (slot k holds PEFT's lora_A transposed, rank padded to R with
zeros) and `<module>.lora_B` [K, R, out] (lora_B transposed, times alpha / r), and computes

    y = x @ W.T (+ bias) + ((x @ A) * mask) @ B     # A as [in, K*R], B as [K*R, out]

where `mask` [tokens, K*R] is 1 on the R columns of the token's slot. Slot ids are an entry
input, one per token (`lora_slots`), 0 meaning the base model alone, 1..K the slots, so one
forward batches sequences of different adapters. Two dense matmuls over all slots, rather than
a gather of each token's matrices, keep the work at K*R*(in + out) per token with no
[tokens, R, in] copy. The matrices start as zeros (every slot empty); the runtime writes them
(runtime/lora.py). They are used through a reshape, not as `matmul(x, permute_dims(w))`, so
quantization leaves them in the model's dtype and q/k/v fusion leaves them apart.
"""

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import spec as nn_spec

from relaxlm.errors import RelaxlmError

from .checkpoint import Checkpoint
from .entry import CausalLM, VisionLM
from .gpt2 import Conv1D


@dataclass(frozen=True)
class LoraSlotsSpec:
    """What to compile: `slots` adapters at once, each of rank <= `max_rank`, on the linear
    layers whose name's last part is in `targets` (PEFT's target_modules: `q_proj`, ...;
    None: every linear layer but the logits head)."""

    slots: int
    max_rank: int = 16
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("slots", "max_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RelaxlmError(
                    f"lora_{name}={value!r} is invalid; set it to an integer >= 1"
                    + (" (adapters served at once)" if name == "slots" else " (their most rank)")
                )
        if self.targets is not None and (
            not self.targets or not all(isinstance(t, str) and t for t in self.targets)
        ):
            raise RelaxlmError(
                f"lora_targets={self.targets!r} is invalid; name module names such as "
                "['q_proj', 'v_proj'], or leave it unset for every linear layer"
            )


class _SlotMask:
    """The entry's per-token slot mask, read by every LoraLinear while the entry is traced
    (a layer's forward takes only x, so the entry hands the mask over here)."""

    def __init__(self, slots: int, rank: int, dtype: str):
        self.slots, self.rank, self.dtype = slots, rank, dtype
        self.mask: nn.Tensor | None = None

    def set(self, ids: nn.Tensor) -> None:
        """ids [tokens] int32 -> mask [tokens, K*R]: 1 where the column belongs to the slot."""
        columns = np.repeat(np.arange(1, self.slots + 1, dtype="int32"), self.rank)  # [K*R]
        hit = relax.op.equal(relax.op.expand_dims(ids._expr, 1), relax.const(columns))
        self.mask = nn.op.wrap_nested(relax.op.astype(hit, self.dtype), name="lora_mask")


class _SlotsUpdate:
    """The slots' low-rank update of a projection, mixed into the projection's own class so its
    weight and bias keep their checkpoint names."""

    def _add_slots(self, in_features: int, out_features: int, dtype: str, mask: _SlotMask):
        k, r = mask.slots, mask.rank
        self.lora_A = nn.Parameter((in_features, k, r), dtype)
        self.lora_B = nn.Parameter((k, r, out_features), dtype)
        self._slot_mask, self._out = mask, out_features

    def _plus_update(self, x: nn.Tensor, y: nn.Tensor) -> nn.Tensor:
        k, r = self._slot_mask.slots, self._slot_mask.rank
        *lead, width = x.shape
        tokens = 1
        for d in lead:
            tokens = tokens * d
        flat = nn.op.reshape(x, (tokens, width))  # [tokens, in]; one slot id per token
        a = nn.op.reshape(self.lora_A, (width, k * r))  # [in, K*R]
        b = nn.op.reshape(self.lora_B, (k * r, self._out))  # [K*R, out]
        low = nn.op.matmul(flat, a) * self._slot_mask.mask  # [tokens, K*R], other slots zeroed
        update = nn.op.reshape(nn.op.matmul(low, b), (*lead, self._out))
        return y + update.astype(y.dtype) if update.dtype != y.dtype else y + update


class LoraLinear(_SlotsUpdate, nn.Linear):
    """nn.Linear (same weight and bias names) plus the adapter slots' low-rank update."""

    def __init__(self, base: nn.Linear, slot_mask: _SlotMask):
        nn.Linear.__init__(
            self,
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            dtype=base.weight.dtype,
            out_dtype=base.out_dtype,
        )
        self.weight, self.bias = base.weight, base.bias
        self._add_slots(base.in_features, base.out_features, base.weight.dtype, slot_mask)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self._plus_update(x, nn.Linear.forward(self, x))


class LoraConv1D(_SlotsUpdate, Conv1D):
    """GPT-2's Conv1D (weight [in, out]) plus the slots' update. PEFT's lora_A and lora_B have
    the same shapes for a Conv1D as for an nn.Linear (its `fan_in_fan_out` only transposes the
    merged product), so the runtime fills these slots the same way."""

    def __init__(self, base: Conv1D, slot_mask: _SlotMask):
        in_features, out_features = (int(d) for d in base.weight.shape)
        Conv1D.__init__(self, in_features, out_features)
        self.weight, self.bias = base.weight, base.bias
        self._add_slots(in_features, out_features, base.weight.dtype, slot_mask)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self._plus_update(x, Conv1D.forward(self, x))


_WITH_SLOTS = {nn.Linear: LoraLinear, Conv1D: LoraConv1D}


def add_lora_slots(model: nn.Module, spec: LoraSlotsSpec, dtype: str) -> tuple[_SlotMask, dict]:
    """Replace the targeted linear layers of `model` (in place) by LoraLinear; the mask they
    share, and the manifest's `targets`: module name -> {in, out}."""
    if not isinstance(model, CausalLM) or isinstance(model, VisionLM):
        raise RelaxlmError(
            f"{type(model).__name__}: LoRA slots are for text decoder models (LlamaForCausalLM "
            "and the others of that kind); merge the adapter at compile time instead (--lora)"
        )
    slot_mask = _SlotMask(spec.slots, spec.max_rank, dtype)
    targets: dict[str, dict[str, int]] = {}
    for name, parent in list(_named_modules(model)):
        for attr, child in list(vars(parent).items()):
            with_slots = _WITH_SLOTS.get(type(child))
            module = f"{name}.{attr}" if name else attr
            if with_slots is None or not _targeted(module, attr, spec.targets):
                continue
            layer = with_slots(child, slot_mask)
            setattr(parent, attr, layer)
            targets[module] = {"in": int(layer.lora_A.shape[0]), "out": layer._out}
    if not targets:
        raise RelaxlmError(
            f"lora_targets={list(spec.targets or [])!r} names no linear layer of "
            f"{type(model).__name__}; name its modules as PEFT's target_modules do (q_proj, ...)"
        )
    return slot_mask, targets


def _targeted(module: str, attr: str, targets: tuple[str, ...] | None) -> bool:
    if targets is None:  # the logits head stays as it is: adapters rarely train it
        return attr != "lm_head"
    return any(attr == t or re.fullmatch(t, module) for t in targets)


def _named_modules(module: nn.Module, prefix: str = ""):
    """(dotted name, module) for `module` and every module under it, lists included."""
    yield prefix, module
    children = enumerate(module) if isinstance(module, nn.ModuleList) else vars(module).items()
    for attr, child in list(children):
        if isinstance(child, nn.Module | nn.ModuleList):
            yield from _named_modules(child, f"{prefix}.{attr}" if prefix else str(attr))


def export_with_slots(model: CausalLM, spec: LoraSlotsSpec, dtype: str):
    """Add the slots and export prefill / decode with their `lora_slots` input:
    (IRModule, [(name, nn.Parameter)], the manifest's `lora_slots`)."""
    slot_mask, targets = add_lora_slots(model, spec, dtype)
    model.to(dtype)

    def prefill(input_ids, logit_positions, lora_slots):
        slot_mask.set(lora_slots)
        return model.prefill(input_ids, logit_positions)

    def decode(input_ids, lora_slots):
        slot_mask.set(lora_slots)
        return model.decode(input_ids)

    modes = {"param_mode": "packed", "effect_mode": "none"}
    methods = {
        "prefill": (
            prefill,
            {
                "input_ids": nn.spec.Tensor([1, "num_tokens"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "lora_slots": nn.spec.Tensor(["num_tokens"], "int32"),
            },
        ),
        "decode": (
            decode,
            {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                "lora_slots": nn.spec.Tensor(["batch_size"], "int32"),
            },
        ),
    }
    module_spec = nn_spec.ModuleSpec(
        model,
        list(methods),
        [nn_spec.MethodSpec.from_raw({**args, "$": modes}, f) for f, args in methods.values()],
    )
    mod, named_params = model.export_tvm(spec=module_spec)
    manifest = {
        "slots": spec.slots,
        "max_rank": spec.max_rank,
        "targets": {
            module: {**shape, "A": f"{module}.lora_A", "B": f"{module}.lora_B"}
            for module, shape in targets.items()
        },
    }
    return mod, named_params, manifest


def is_slot_weight(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


@dataclass(frozen=True)
class _Zeros:
    """A slot weight the checkpoint lacks: zeros (every slot empty) of this shape and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class SlotCheckpoint(Checkpoint):
    """A checkpoint that also reads the slot weights (as zeros)."""

    base: Checkpoint | None = field(default=None, repr=False)

    @property
    def weight_files(self):
        return self.base.weight_files

    @property
    def tokenizer_files(self):
        return self.base.tokenizer_files

    @property
    def adapters(self) -> tuple:
        return self.base.adapters

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if isinstance(info, _Zeros):
            return np.zeros(info.shape, info.dtype)
        return self.base.read(name)


def with_slot_weights(checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    """`checkpoint` with zero tensors for the slot weights among `shapes`."""
    if checkpoint.stored_types or hasattr(checkpoint, "read_int4"):
        raise RelaxlmError(
            f"{checkpoint.path}: LoRA slots need a float Hugging Face safetensors base (this one "
            "stores quantized blocks); pass the float checkpoint, with --quant for a quantized "
            "base"
        )
    zeros: dict[str, Any] = {
        n: _Zeros(s, np.dtype("float32")) for n, s in shapes.items() if is_slot_weight(n)
    }
    return SlotCheckpoint(
        path=checkpoint.path,
        config=checkpoint.config,
        tensors={**checkpoint.tensors, **zeros},
        base=checkpoint,
    )

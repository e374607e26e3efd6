"""LoRA adapters loaded into an artifact's adapter slots at run time (frontends/lora_slots.py).

An artifact compiled with K slots of rank R holds, per targeted linear layer, `lora_A`
[in, K, R] and `lora_B` [K, R, out]. Loading a PEFT adapter into slot k writes its lora_A
transposed into A[:, k-1, :r] and lora_B transposed, times its scale (alpha / r, or
alpha / sqrt(r) with rsLoRA), into B[k-1, :r, :]; the rows past r and the layers it does not
adapt are zeros, so they add nothing. Unloading zeros the slot. Sequences pick a slot by id
(0: the base model), so requests of different adapters share one forward.

The caller (the engine) serializes loads with forwards: a slot changes between steps only.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relaxlm.artifacts.peft_lora import CONFIG, WEIGHTS, module_updates, read_adapter
from relaxlm.artifacts.safetensors_io import DTYPES, read
from relaxlm.errors import RelaxlmError

from .model import CompiledModel


@dataclass(frozen=True)
class LoadedLora:
    """An adapter in a slot. `key` is unique per load: prompt prefixes cached under one load
    are never reused by another adapter given the same slot later."""

    name: str
    path: Path
    slot: int
    key: int
    rank: int


class LoraSlots:
    """Which adapter each slot of a model holds; loads adapters into free slots, unloads them."""

    def __init__(self, model: CompiledModel):
        spec = model.manifest.lora_slots
        if not spec:
            raise RelaxlmError(
                f"{model.folder} has no LoRA slots; compile the base with lora_slots=K "
                "(`relaxlm compile BASE --lora-slots K`) to load adapters at run time"
            )
        self.model = model
        self.num_slots, self.max_rank = spec["slots"], spec["max_rank"]
        self.targets: dict[str, dict] = spec["targets"]
        index = {p["name"]: i for i, p in enumerate(model.manifest.params)}
        dtypes = {p["name"]: p["dtype"] for p in model.manifest.params}
        self._param = {t[w]: index[t[w]] for t in self.targets.values() for w in ("A", "B")}
        # Host copies of the slot weights: a load rewrites one slot and uploads the tensor.
        self._host = {
            name: np.zeros(model.manifest.params[i]["shape"], DTYPES[dtypes[name]])
            for name, i in self._param.items()
        }
        self._loaded: dict[str, LoadedLora] = {}
        self._keys = itertools.count(1)  # 0: the base model's cached prefixes

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

    def adapters(self) -> dict[str, LoadedLora]:
        """The loaded adapters by name, in load order."""
        return dict(self._loaded)

    def get(self, name: str) -> LoadedLora:
        """The loaded adapter `name`; RelaxlmError naming those loaded when it is not."""
        if name not in self._loaded:
            have = ", ".join(self._loaded) or "none"
            raise RelaxlmError(
                f"LoRA adapter {name!r} is not loaded (loaded: {have}); load it first "
                "(LLM.load_lora(name, path), or POST /v1/load_lora_adapter)"
            )
        return self._loaded[name]

    def load(self, name: str, path) -> LoadedLora:
        """Read the PEFT adapter folder `path` into a free slot under `name`."""
        if not isinstance(name, str) or not name:
            raise RelaxlmError(f"LoRA adapter name {name!r} is invalid; give a non-empty string")
        if name in self._loaded:
            raise RelaxlmError(
                f"a LoRA adapter named {name!r} is loaded already (from "
                f"{self._loaded[name].path}); unload it first, or pick another name"
            )
        used = {a.slot for a in self._loaded.values()}
        free = [k for k in range(1, self.num_slots + 1) if k not in used]
        if not free:
            raise RelaxlmError(
                f"no free LoRA slot for {name!r}: all {self.num_slots} hold adapters "
                f"({', '.join(self._loaded)}); unload one, or compile the base with more "
                "slots (lora_slots)"
            )
        adapter = read_adapter(path)
        rows = self._slot_rows(adapter)  # every check before any slot changes
        slot = free[0]
        for module in self.targets:
            self._write(module, slot, *rows.get(module, (None, None)))
        ranks = [a.shape[1] for a, _ in rows.values()]  # a: [in, r]
        loaded = LoadedLora(name, adapter.path, slot, next(self._keys), max(ranks))
        self._loaded[name] = loaded
        return loaded

    def unload(self, name: str) -> LoadedLora:
        """Empty the slot of adapter `name`."""
        loaded = self.get(name)
        for module in self.targets:
            self._write(module, loaded.slot, None, None)
        del self._loaded[name]
        return loaded

    def _slot_rows(self, adapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Target module -> (A^T [in, r], scale * B^T [r, out]) of the adapter, checked."""
        where = adapter.path / WEIGHTS
        rows = {}
        for m in module_updates(adapter):
            target = self._target_of(m.module)
            if target is None:
                raise RelaxlmError(
                    f"{where}: the adapter adapts module {m.module}, which has no LoRA slot in "
                    f"{self.model.folder} (slots on: {_summary(self.targets)}); compile the base "
                    "with lora_targets naming it, or train the adapter on those modules"
                )
            if m.rank > self.max_rank:
                raise RelaxlmError(
                    f"{where}: module {m.module} has rank {m.rank}, over the slots' most rank "
                    f"{self.max_rank}; compile the base with lora_max_rank >= {m.rank}"
                )
            if m.bias is not None:
                raise RelaxlmError(
                    f"{where}: module {m.module} has a lora_B bias (lora_bias=True), which "
                    "adapter slots do not apply; merge the adapter at compile time (--lora)"
                )
            shape = self.targets[target]
            want_a, want_b = (m.rank, shape["in"]), (shape["out"], m.rank)
            if tuple(m.a.shape) != want_a or tuple(m.b.shape) != want_b:
                raise RelaxlmError(
                    f"{where}: module {m.module}: lora_A is {list(m.a.shape)} and lora_B "
                    f"{list(m.b.shape)}, but the base layer is {shape['in']} -> {shape['out']} "
                    f"(lora_A {list(want_a)}, lora_B {list(want_b)}); was the adapter made for "
                    "another base model?"
                )
            a = read(m.a).astype(np.float32).T  # [in, r]
            b = read(m.b).astype(np.float32).T * np.float32(m.scale)  # [r, out]
            rows[target] = (a, b)
        if not rows:
            raise RelaxlmError(f"{adapter.path / CONFIG}: the adapter adapts no module")
        return rows

    def _target_of(self, module: str) -> str | None:
        """The slot target `module` names: the same name, or one a leading part longer or
        shorter (adapters trained on the bare trunk name `layers.0...`, not `model.layers.0...`)."""
        if module in self.targets:
            return module
        shorter = module.split(".", 1)[-1]
        if shorter in self.targets:
            return shorter
        longer = [t for t in self.targets if t.endswith(f".{module}")]
        return longer[0] if len(longer) == 1 else None

    def _write(self, module: str, slot: int, a: np.ndarray | None, b: np.ndarray | None) -> None:
        """Slot `slot` of the module's A and B: these rows, zero-padded to the rank, or zeros."""
        names = self.targets[module]["A"], self.targets[module]["B"]
        host_a, host_b = (self._host[n] for n in names)
        host_a[:, slot - 1, :] = 0  # [in, K, R]
        host_b[slot - 1] = 0  # [K, R, out]
        if a is not None:
            r = a.shape[1]
            host_a[:, slot - 1, :r] = a.astype(host_a.dtype)
            host_b[slot - 1, :r] = b.astype(host_b.dtype)
        for name, host in zip(names, (host_a, host_b), strict=True):
            self.model.params[self._param[name]].copyfrom(host)


def _summary(targets: dict) -> str:
    kinds = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return f"{len(targets)} layers: {', '.join(kinds)}"

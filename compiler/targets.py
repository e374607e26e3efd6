"""Named target presets: which TVM target, and how its library is exported."""

import os
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.target import codegen

from relaxlm.errors import RelaxlmError


@dataclass(frozen=True)
class TargetPreset:
    name: str
    tvm_target: dict[str, Any]  # TVM 0.27 takes targets as JSON dicts only
    library_suffix: str
    device: str  # the runtime device kind, as tvm.runtime.device() names it

    def target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_target)


def _host_cpu() -> dict[str, Any]:
    # The wheel's default triple is x86_64-conda-linux-gnu; name the plain one so the
    # library links against the system's C runtime.
    triple = codegen.llvm_get_system_triple().replace("-conda-", "-")
    return {
        "kind": "llvm",
        "mtriple": triple,
        "mcpu": codegen.llvm_get_system_cpu(),
        "num-cores": os.cpu_count() or 1,
    }


def resolve_target(name: str) -> TargetPreset:
    """The preset called `name`; only `cpu` (this machine's CPU features) so far."""
    if name == "cpu":
        return TargetPreset("cpu", _host_cpu(), ".so", "cpu")
    raise RelaxlmError(f"target {name!r} is not supported yet; supported: cpu")

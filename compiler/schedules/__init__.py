"""Per-target schedule rule sets over the fused TIR kernels."""

import tvm

from ..targets import TargetPreset


def for_target(preset: TargetPreset) -> tvm.transform.Pass:
    """The schedule pass for a target preset."""
    if preset.device == "cpu":
        from .cpu import cpu_schedules

        return cpu_schedules()
    from .gpu import gpu_schedules

    return gpu_schedules()

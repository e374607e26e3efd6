"""CPU schedules (placeholder: unscheduled TIR)."""

import tvm


def cpu_schedules() -> tvm.transform.Pass:
    return tvm.transform.Sequential([])

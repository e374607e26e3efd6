"""NVIDIA's libraries from their PyPI wheels, and the CUDA driver calls their bindings share.

runtime/nccl.py (NCCL) and runtime/cublas.py (cuBLAS) bind libraries that the `cuda` extra
installs as wheels (`nvidia-nccl-cu13`, `nvidia-cublas`): each wheel puts its library under the
`nvidia` namespace package (`nvidia/nccl/lib/`, `nvidia/cu13/lib/`). A library is found at its
environment variable, else in those wheels, else wherever the dynamic loader finds it.

Imports only ctypes and relaxlm's errors - never compiler code.
"""

import ctypes
import importlib.util
import os
from pathlib import Path

from relaxlm.errors import RelaxlmError


def find_library(variable: str, wheel_paths: tuple[str, ...], soname: str) -> str:
    """$`variable`, else the first of `wheel_paths` (relative to the `nvidia` package) that an
    installed wheel provides, else `soname` for the dynamic loader's search path."""
    if os.environ.get(variable):
        return os.environ[variable]
    spec = importlib.util.find_spec("nvidia")
    for folder in spec.submodule_search_locations if spec else ():
        for relative in wheel_paths:
            if (Path(folder) / relative).is_file():
                return str(Path(folder) / relative)
    return soname


def make_current(device: int) -> None:
    """Make CUDA device `device`'s primary context current on this thread (the driver API, so
    no CUDA runtime of a particular version is needed; TVM's runtime uses the same context)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RelaxlmError(f"no CUDA driver on this machine (libcuda.so.1: {e})") from e
    handle, context = ctypes.c_int(), ctypes.c_void_p()
    _driver(cuda, "cuInit", 0)
    _driver(cuda, "cuDeviceGet", ctypes.byref(handle), device)
    _driver(cuda, "cuDevicePrimaryCtxRetain", ctypes.byref(context), handle)
    _driver(cuda, "cuCtxSetCurrent", context)


def _driver(cuda: ctypes.CDLL, call: str, *args) -> None:
    try:
        function = getattr(cuda, call)
    except AttributeError as e:  # not NVIDIA's driver (a stand-in without the call)
        raise RelaxlmError(f"the CUDA driver library has no {call} ({e})") from e
    result = function(*args)
    if result != 0:
        raise RelaxlmError(f"CUDA driver call {call} failed with CUresult {result}")

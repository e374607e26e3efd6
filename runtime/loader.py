"""Loading an artifact for one device: manifest -> that device's library -> VM, device, weights.

The one loader behind every model kind (CompiledModel, EmbeddingModel), so each picks its
library and reports a missing library or device the same way.

Imports only the TVM runtime, numpy and relaxlm's artifact format - never compiler code.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.runtime.vm import VirtualMachine

from relaxlm.artifacts import Manifest, check_files, weight_index
from relaxlm.artifacts.safetensors_io import read
from relaxlm.errors import RelaxlmError

# How an error names each manifest task.
_TASKS = {
    "generate": "a text generator",
    "embed": "an embedding model",
    "transcribe": "a speech recognizer",
    "synthesize": "a speech synthesizer",
}


@dataclass
class LoadedArtifact:
    """An artifact ready to run on one device: its VM and its weights there."""

    folder: Path
    manifest: Manifest
    device: tvm.runtime.Device
    vm: VirtualMachine
    params: list[tvm.runtime.Tensor]  # in the graph's parameter order (manifest.params)
    threads: int  # the CPU thread pool's size (see use_threads)


def load_artifact(
    folder: str | os.PathLike, device: str, task: str, threads: int | None = None
) -> LoadedArtifact:
    """The artifact at `folder` loaded on `device` ("cpu", "cuda:0", ...); RelaxlmError if it
    is not a `task` artifact, a file is missing or the wrong size, a shard's header is damaged,
    or it has no library for that device."""
    threads = use_threads(threads)
    folder = Path(folder)
    manifest = Manifest.read(folder)
    if manifest.task != task:
        raise RelaxlmError(
            f"{folder} is {_TASKS.get(manifest.task, manifest.task)} ({manifest.architecture}), "
            f"not {_TASKS[task]}"
        )
    check_files(folder, manifest)  # sizes only: verify() would hash seconds per GB
    library = library_for_device(folder, manifest, device)
    dev = open_device(device)
    vm = VirtualMachine(load_library(library, device), dev)
    index = weight_index(folder, manifest)
    params = [tvm.runtime.tensor(read(index[p["name"]]), dev) for p in manifest.params]
    return LoadedArtifact(folder, manifest, dev, vm, params, threads)


def use_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool: `threads`, else RELAXLM_THREADS, else TVM_NUM_THREADS, else
    every CPU this process may run on.

    TVM reads TVM_NUM_THREADS once, when its first parallel kernel starts the pool; unset, it
    counts half the CPUs on x86 (assuming hyper-threads) - one thread on a 2-vCPU machine.
    Process-wide: the first model loaded decides.
    """
    n = threads or int(os.environ.get("RELAXLM_THREADS") or 0)
    n = n or int(os.environ.get("TVM_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    if n < 1:
        raise RelaxlmError(f"threads={n} is invalid; set it to a positive integer")
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n


def library_for_device(folder: Path, manifest: Manifest, device: str) -> Path:
    """The artifact's library for `device` ("cpu", "cuda:0", ...): the target whose manifest
    entry names that device kind (older artifacts: the target named like it)."""
    kind = device.split(":")[0]
    for name, entry in manifest.targets.items():
        if entry.get("device", name) == kind:
            return folder / entry["library"]
    built = ", ".join(f"{n} ({e.get('device', n)})" for n, e in manifest.targets.items())
    raise RelaxlmError(
        f"{folder}: artifact has no library for device {device!r} (built for: {built}); "
        f"compile it with --target {kind} (one artifact may hold several targets)"
    )


def open_device(device: str) -> tvm.runtime.Device:
    """The TVM device called `device` ("cpu", "cuda:0", "metal"); RelaxlmError if it is not
    there (no GPU, no driver, or a TVM without that runtime)."""
    try:
        dev = tvm.runtime.device(device)
    except (ValueError, RuntimeError) as e:  # TVM 0.27 raises built-ins (no tvm.error.TVMError)
        raise RelaxlmError(f"device {device!r} is not a device name TVM knows ({e})") from e
    if device.split(":")[0] != "cpu" and not dev.exist:
        raise RelaxlmError(
            f"device {device!r} is not available on this machine: no such GPU, no driver, or "
            f"this TVM build has no {device.split(':')[0]} runtime (tvm {tvm.__version__})"
        )
    return dev


def load_library(path: Path, device: str) -> tvm.runtime.Module:
    """The compiled library at `path`; RelaxlmError naming what is missing if TVM can't load it."""
    try:
        return tvm.runtime.load_module(str(path))
    except (RuntimeError, ValueError) as e:  # InternalError is a RuntimeError
        raise RelaxlmError(
            f"{path}: the {device} library does not load in this TVM ({e}); load it where TVM "
            f"has the {device.split(':')[0]} runtime (e.g. its GPU driver), or recompile"
        ) from e

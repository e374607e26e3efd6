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

from relaxlm.artifacts import Manifest, check_files, cpu_features, weight_index
from relaxlm.artifacts.device_map import parse_device_map
from relaxlm.artifacts.safetensors_io import read
from relaxlm.errors import RelaxlmError

from . import cublas, library_gemm  # noqa: F401 (registers the GEMM `--gemm library` calls)

# How an error names each manifest task.
_TASKS = {
    "generate": "a text generator",
    "embed": "an embedding model",
    "transcribe": "a speech recognizer",
    "synthesize": "a speech synthesizer",
}


@dataclass
class LoadedStage:
    """One pipeline stage of a model split across devices, loaded on its device."""

    device: tvm.runtime.Device
    vm: VirtualMachine
    params: list[tvm.runtime.Tensor]  # the stage's weights, in its library's order
    layers: tuple[int, int]  # decoder layers [first, end)
    kv_cache: dict  # the layout of the stage's own cache (manifest.stages[k].kv_cache)


@dataclass
class LoadedArtifact:
    """An artifact ready to run on one device (its VM and its weights there), or on several,
    one pipeline stage each."""

    folder: Path
    manifest: Manifest
    device: tvm.runtime.Device  # a split model: its first stage's
    vm: VirtualMachine
    params: list[tvm.runtime.Tensor]  # in the graph's parameter order (manifest.params)
    threads: int  # the CPU thread pool's size (see use_threads)
    stages: list[LoadedStage]  # one covering every layer for a model on one device


def load_artifact(
    folder: str | os.PathLike,
    device: str,
    task: str,
    threads: int | None = None,
    device_map: str | None = None,
) -> LoadedArtifact:
    """The artifact at `folder` loaded on `device` ("cpu", "cuda:0", ...); RelaxlmError if it
    is not a `task` artifact, a file is missing or the wrong size, a shard's header is damaged,
    or it has no library for that device.

    A model split across devices (manifest.stages) loads each stage on the device its manifest
    names, or `device_map`'s (the same layers and device kinds; other ordinals), and `device`
    is not used.
    """
    threads = use_threads(threads)
    folder = Path(folder)
    manifest = Manifest.read(folder)
    if manifest.task != task:
        raise RelaxlmError(
            f"{folder} is {_TASKS.get(manifest.task, manifest.task)} ({manifest.architecture}), "
            f"not {_TASKS[task]}"
        )
    check_files(folder, manifest)  # sizes only: verify() would hash seconds per GB
    index = weight_index(folder, manifest)
    if manifest.stages:
        devices = _stage_devices(manifest, device_map)
        stages = [
            _load_stage(folder, entry, name, index)
            for entry, name in zip(manifest.stages, devices, strict=True)
        ]
        first = stages[0]
        return LoadedArtifact(
            folder, manifest, first.device, first.vm, first.params, threads, stages
        )
    if device_map is not None:
        raise RelaxlmError(
            f"{folder} was compiled for one device, so it takes no device map; compile the "
            f"checkpoint with --device-map {device_map}"
        )
    library = library_for_device(folder, manifest, device)
    dev = open_device(device)
    vm = VirtualMachine(load_library(library, device), dev)
    params = [tvm.runtime.tensor(read(index[p["name"]]), dev) for p in manifest.params]
    num_layers = manifest.kv_cache.get("num_layers", 0)
    whole = LoadedStage(dev, vm, params, (0, num_layers), manifest.kv_cache)
    return LoadedArtifact(folder, manifest, dev, vm, params, threads, [whole])


def _stage_devices(manifest: Manifest, device_map: str | None) -> list[str]:
    """The device of each stage: the manifest's, or device_map's where it splits the layers
    alike onto devices of the same kinds."""
    built = [entry["device"] for entry in manifest.stages]
    if device_map is None:
        return built
    wanted = parse_device_map(device_map)
    same = [(s.first, s.end, s.kind) for s in wanted] == [
        (e["layers"][0], e["layers"][1], e["device"].split(":")[0]) for e in manifest.stages
    ]
    if not same:
        compiled = ",".join(
            f"{e['device']}:{e['layers'][0]}-{e['layers'][1] - 1}" for e in manifest.stages
        )
        raise RelaxlmError(
            f"device map {device_map!r} differs from the one the artifact was compiled with "
            f"({compiled}); only the device ordinals may change at load time: recompile for "
            "other layers or device kinds"
        )
    return [s.device for s in wanted]


def _load_stage(folder: Path, entry: dict, device: str, index: dict) -> LoadedStage:
    dev = open_device(device)
    _check_cpu_features(folder, entry.get("cpu_features", []))
    vm = VirtualMachine(load_library(folder / entry["library"], device), dev)
    params = [tvm.runtime.tensor(read(index[name]), dev) for name in entry["params"]]
    return LoadedStage(dev, vm, params, tuple(entry["layers"]), entry["kv_cache"])


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
            _check_cpu_features(folder, entry.get("cpu_features", []))
            if entry.get("gemm") == "library" and kind == "cuda":
                cublas.library()  # its GEMMs call cuBLAS: say so now if it is missing
            return folder / entry["library"]
    built = ", ".join(f"{n} ({e.get('device', n)})" for n, e in manifest.targets.items())
    raise RelaxlmError(
        f"{folder}: artifact has no library for device {device!r} (built for: {built}); "
        f"compile it with --target {kind} (one artifact may hold several targets)"
    )


def _check_cpu_features(folder: Path, required: list[str]) -> None:
    """RelaxlmError (rather than SIGILL mid-forward) if this CPU lacks an extension the
    library was compiled to use."""
    lacking = cpu_features.missing(required, cpu_features.host_flags())
    if lacking:
        raise RelaxlmError(
            f"{folder}: its CPU library uses {', '.join(lacking)}, which this CPU lacks; "
            "compile it for this machine (--target cpu), or for the oldest CPU it must run on "
            "(e.g. --target cpu:haswell for any AVX2 machine)"
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

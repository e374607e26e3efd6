"""Named target presets: which TVM target, its schedule rules, and how its library is exported.

    cpu                   this machine's CPU (LLVM, its features), a `.so`
    cpu:NAME              a CPU LLVM names (`llc -mcpu=help`), for a library built on one
                          machine to run on others: cpu:haswell (AVX2), cpu:alderlake, ...
    cuda[:sm_XX[,sm_YY]]  NVIDIA GPUs; device code compiled ahead of time by nvcc for each arch
                          into one fatbin (plus PTX of the lowest arch for newer GPUs), a `.so`
    metal                 Apple GPUs: MSL kernels + arm64 macOS host objects, a `.tar` that
                          TVM links on the Mac when it loads it
    webgpu                WGSL kernels + wasm32 host objects, a `.tar` for TVM's web runtime
    vulkan                SPIR-V kernels; needs a TVM built with Vulkan (the PyPI wheel is not)

Several presets may be asked for at once: `cuda:sm_80,sm_90,metal` (an `sm_XX` item extends
the CUDA preset before it) or a list of names.
"""

import contextlib
import ctypes
import difflib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.target import codegen

from relaxlm.artifacts.cpu_features import CPUINFO_FLAGS, host_flags
from relaxlm.errors import RelaxlmError

from .cuda_graph import USE_CUDA_GRAPH

CUDA_DEFAULT_ARCHS = ("sm_80", "sm_90")  # Ampere (sm_86/sm_89 run its code too) and Hopper
PRESETS = ("cpu", "cpu:NAME", "cuda", "cuda:sm_XX[,sm_YY...]", "metal", "webgpu", "vulkan")
_ARCH = re.compile(r"sm_\d+[a-z]?")


@dataclass(frozen=True)
class TargetPreset:
    name: str  # the library's name in the artifact
    tvm_target: dict[str, Any]  # TVM 0.27 takes targets as JSON dicts only
    library_suffix: str
    device: str  # the runtime device kind, as tvm.runtime.device() names it
    archs: tuple[str, ...] = field(default=())  # CUDA: the archs the fatbin holds code for
    cpu_features: tuple[str, ...] = field(default=())  # CPU: the SIMD extensions it may use

    def target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_target)

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def extra_manifest(self) -> dict[str, Any]:
        """What the manifest records of this preset beside its library and TVM target."""
        extra: dict[str, Any] = {"device": self.device}
        if self.archs:
            extra["archs"] = list(self.archs)
        if self.cpu_features:
            extra["cpu_features"] = list(self.cpu_features)
        return extra


def _cpu(name: str, mcpu: str) -> dict[str, Any]:
    """The LLVM target of CPU `mcpu` (empty: this machine's) for target `name`."""
    # The wheel's default triple is x86_64-conda-linux-gnu; name the plain one so the
    # library links against the system's C runtime.
    triple = codegen.llvm_get_system_triple().replace("-conda-", "-")
    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, triple):
        known = list(codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"})))
        close = difflib.get_close_matches(mcpu, known, n=3)
        raise RelaxlmError(
            f"target {name!r}: LLVM knows no CPU {mcpu!r}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; write cpu:NAME with one of LLVM's CPU names (llc -mcpu=help), e.g. cpu:haswell "
            "(AVX2), cpu:skylake-avx512, cpu:alderlake (AVX-VNNI), cpu:icelake-server (AVX-512 "
            "VNNI), or cpu for this machine's"
        )
    return {
        "kind": "llvm",
        "mtriple": triple,
        "mcpu": mcpu or codegen.llvm_get_system_cpu(),
        "num-cores": os.cpu_count() or 1,
    }


def _simd_features(target: dict[str, Any], native: bool) -> tuple[str, ...]:
    """The SIMD extensions (artifacts/cpu_features.py) LLVM's model of the target's CPU has,
    which the runtime requires of the CPU that loads the library."""
    enabled = set(codegen.llvm_get_cpu_features(tvm.target.Target(target)))
    features = [f for f in CPUINFO_FLAGS if f in enabled]
    flags = host_flags() if native else None
    if flags is not None:
        # This machine's library always loads here: LLVM's model of its CPU may name an
        # extension that a hypervisor hides from it.
        features = [f for f in features if CPUINFO_FLAGS[f] in flags]
    return tuple(features)


def _portable_host() -> dict[str, Any]:
    """Host code of a GPU library: only VM glue, so no CPU features of the build machine (the
    GPU machine's CPU may lack them)."""
    return {"kind": "llvm", "mtriple": codegen.llvm_get_system_triple().replace("-conda-", "-")}


def resolve_target(name: str) -> TargetPreset:
    """The preset called `name` (see the module docstring)."""
    kind, _, options = name.partition(":")
    if kind == "cpu":
        target = _cpu(name, options.strip())
        features = _simd_features(target, native=not options.strip())
        return TargetPreset("cpu", target, ".so", "cpu", cpu_features=features)
    if kind == "cuda":
        archs = tuple(a.strip() for a in options.split(",")) if options else CUDA_DEFAULT_ARCHS
        bad = [a for a in archs if not _ARCH.fullmatch(a)]
        if bad:
            raise RelaxlmError(
                f"target {name!r}: {', '.join(map(repr, bad))} is not a CUDA arch; write "
                "cuda:sm_80,sm_90 (compute capability 8.0 -> sm_80)"
            )
        archs = tuple(sorted(set(archs), key=lambda a: int(re.sub(r"\D", "", a))))
        # Schedules are made for the lowest arch, so every arch in the fatbin can run them.
        target = {"kind": "cuda", "arch": archs[0], "host": _portable_host()}
        return TargetPreset("cuda", target, ".so", "cuda", archs)
    if kind == "metal" and not options:
        host = {"kind": "llvm", "mtriple": "arm64-apple-macos"}
        return TargetPreset("metal", {"kind": "metal", "host": host}, ".tar", "metal")
    if kind == "webgpu" and not options:
        host = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}
        return TargetPreset("webgpu", {"kind": "webgpu", "host": host}, ".tar", "webgpu")
    if kind == "vulkan" and not options:
        check_vulkan_codegen()
        return TargetPreset("vulkan", {"kind": "vulkan", "host": _portable_host()}, ".so", "vulkan")
    raise RelaxlmError(f"target {name!r} is not supported; supported: {', '.join(PRESETS)}")


def resolve_targets(spec: str | list[str] | tuple[str, ...]) -> list[TargetPreset]:
    """Presets for a comma-separated spec (`cuda:sm_80,sm_90,metal`) or a list of them; an
    `sm_XX` item adds an arch to the CUDA preset before it."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if _ARCH.fullmatch(part) and names and names[-1].startswith("cuda"):
                names[-1] += ("," if ":" in names[-1] else ":") + part
            elif part:
                names.append(part)
    if not names:
        raise RelaxlmError(f"no target in {spec!r}; supported: {', '.join(PRESETS)}")
    presets = [resolve_target(n) for n in names]
    seen = [p.name for p in presets]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise RelaxlmError(
            f"target {twice[0]!r} is asked for twice in {spec!r}; an artifact holds one library "
            "per target (list all CUDA archs in one item: cuda:sm_80,sm_90)"
        )
    return presets


def check_vulkan_codegen() -> None:
    """RelaxlmError unless the installed TVM can generate SPIR-V (Vulkan) code."""
    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
        raise RelaxlmError(
            f"target 'vulkan' needs a TVM built with Vulkan support (USE_VULKAN=ON: SPIR-V "
            f"codegen, with the Vulkan SDK's headers, SPIRV-Headers and SPIRV-Tools); the "
            f"installed apache-tvm {tvm.__version__} has no SPIR-V code generator "
            "(target.build.vulkan). Build TVM from source with Vulkan, or use --target webgpu "
            "(WGSL, which wgpu/Dawn run on Vulkan) or cuda/metal"
        )


@contextlib.contextmanager
def build_context(preset: TargetPreset, device_binaries: bool = True, cuda_graph: bool = False):
    """What TVM's codegen for `preset` needs around `relax.build`.

    GPU targets: the target in scope (TVM's CUDA and dlight code read `Target.current()`). CUDA:
    device code compiled here, ahead of time: TVM's CUDA runtime plugin loaded (it registers the
    CUDA module that holds binaries; without it TVM keeps CUDA source for the GPU machine to
    compile at load time) and TVM's compile callback replaced, for this build only, by nvcc
    building one fatbin with SASS for every arch of the preset and PTX of the lowest arch
    (which newer GPUs compile once, at load, in the driver).

    cuda_graph: TVM's RewriteCUDAGraph switched on (compiler/cuda_graph.py).

    device_binaries=False: CUDA kernels stay CUDA source (TVM's codegen without nvcc, as on a
    build machine without TVM's CUDA plugin; a GPU machine would compile them at load). The
    compile matrix checks codegen so and runs nvcc on a subset. Not possible once the plugin is
    loaded in this process: TVM then always calls the compile callback.
    """
    if not preset.is_gpu:
        yield
        return
    # TVM's TIR common-subexpression pass emits a `cse_vN` use before its definition in some
    # GPU kernels (InternalError in the device lowering, e.g. a Llama of hidden size 256 with
    # llama3 RoPE); nvcc eliminates common subexpressions itself, so GPU builds skip the pass.
    config = {"tirx.disable_cse_tir": True}
    if cuda_graph:
        config[USE_CUDA_GRAPH] = True
    with preset.target(), tvm.transform.PassContext(config=config):
        if preset.device != "cuda":
            yield
            return
        if not device_binaries:
            if _cuda_plugin_loaded():
                raise RelaxlmError(
                    "CUDA source-only codegen was asked for after TVM's CUDA plugin was loaded "
                    "in this process; build source-only libraries first, or in another process"
                )
            yield
            return
        _load_cuda_runtime()
        from tvm.support import nvcc  # noqa: F401 - registers TVM's own compile callback

        original = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        compile_fatbin = functools.partial(nvcc_fatbin, archs=preset.archs)
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_fatbin, override=True)
        try:
            yield
        finally:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", original, override=True)


def nvcc_fatbin(code: str, archs: tuple[str, ...]) -> bytearray:
    """CUDA source -> one fatbin: SASS for each of `archs`, PTX of the lowest."""
    from tvm.support import nvcc

    gencode = [f"arch=compute_{a[3:]},code=sm_{a[3:]}" for a in archs]
    gencode.append(f"arch=compute_{archs[0][3:]},code=compute_{archs[0][3:]}")
    arch = [flag for g in gencode for flag in ("-gencode", g)]
    try:
        return nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc")
    except RuntimeError as e:  # TVM's message is the whole CUDA source, then nvcc's output
        output = str(e).rpartition("Compilation error:")[2].strip()
        raise RelaxlmError(
            f"nvcc could not compile the CUDA kernels for {', '.join(archs)}: {output}"
        ) from None


# TVM's CUDA runtime plugin imports these driver symbols (nm -D --undefined-only).
_DRIVER_SYMBOLS = (
    "cuDeviceGetName",
    "cuFuncSetAttribute",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuLaunchKernelEx",
    "cuModuleGetFunction",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)
_CUDA_ERROR_NO_DEVICE = 100


@functools.cache
def _load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime plugin, so that CUDA codegen produces device binaries.

    The plugin links the driver (`libcuda.so.1`); on a build machine without one, a stub driver
    that answers CUDA_ERROR_NO_DEVICE to every call is loaded first, in this process only (never
    installed on a library path). Nothing here launches a kernel, so no call reaches it.
    """
    if _cuda_plugin_loaded():
        return
    if shutil.which("nvcc") is None:
        raise RelaxlmError(
            "target 'cuda' compiles device code ahead of time with nvcc, which is not on PATH; "
            "install the CUDA toolkit (nvcc) on the build machine"
        )
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        stub = _stub_driver()
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        shutil.rmtree(stub.parent)  # loaded; nothing else may find it
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    folder = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=[folder]
        )
    except (OSError, RuntimeError) as e:
        raise RelaxlmError(
            f"target 'cuda': TVM's CUDA runtime plugin (libtvm_runtime_cuda.so in {folder}) "
            f"does not load ({e}); it needs the CUDA runtime library (libcudart) of the "
            "toolkit TVM was built with"
        ) from e
    if not _cuda_plugin_loaded():
        raise RelaxlmError("target 'cuda': TVM's CUDA runtime plugin loaded but registered nothing")


def _cuda_plugin_loaded() -> bool:
    return tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None


def _stub_driver() -> Path:
    """Build the stub `libcuda.so.1` (see `_load_cuda_runtime`) in a private temporary folder."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RelaxlmError(
            "target 'cuda' on a machine without an NVIDIA driver needs a C compiler (cc) to "
            "build a stand-in for libcuda.so.1 at compile time; install gcc"
        )
    folder = Path(tempfile.mkdtemp(prefix="relaxlm-cuda-stub-"))
    source = folder / "stub.c"
    source.write_text(
        "".join(
            f"int {name}(void) {{ return {_CUDA_ERROR_NO_DEVICE}; }}\n" for name in _DRIVER_SYMBOLS
        )
    )
    library = folder / "libcuda.so.1"
    cmd = [
        compiler,
        "-shared",
        "-fPIC",
        "-Wl,-soname,libcuda.so.1",
        "-o",
        str(library),
        str(source),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return library

"""GPU artifacts built on a machine without a GPU: CUDA (sm_80 + sm_90), Metal and WebGPU
libraries over one set of weights, checked by what they hold; Vulkan's clear refusal.

Nothing here runs the GPU code (test_webgpu_kernels.py runs the shared schedules as WGSL); it
checks that each library holds compiled device code for every kernel: SASS for each requested
CUDA arch plus PTX (parsed from the fatbin), MSL in the Metal objects, WGSL in the WebGPU ones.
"""

import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile

import pytest

from relaxlm.artifacts import Manifest

# CUDA device code needs nvcc (the CUDA toolkit) on the build machine; without it the CUDA
# checks skip, saying so, and the other targets are still built and checked.
NVCC = shutil.which("nvcc")
BUILT = {"cuda", "metal", "webgpu"} if NVCC else {"metal", "webgpu"}
TARGETS = ["--target", "cuda:sm_80,sm_90,metal" if NVCC else "metal", "--target", "webgpu"]
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on PATH")
FATBIN_MAGIC = 0xBA55ED50
_PTX, _ELF = 1, 2  # fatbin entry kinds


def _relaxlm(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a build job runs it."""
    cmd = [sys.executable, "-m", "relaxlm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def artifact(checkpoints, tmp_path_factory):
    """A tiny q4 Llama compiled for three GPU targets into one artifact."""
    out = tmp_path_factory.mktemp("gpu") / "artifact"
    result = _relaxlm(
        "compile", str(checkpoints("llama_gqa")), "-o", str(out), "--quant", "q4", *TARGETS
    )
    assert result.returncode == 0, result.stderr
    return out


def test_manifest_lists_each_target_with_its_library(artifact):
    m = Manifest.read(artifact)
    assert set(m.targets) == BUILT
    suffix = {"cuda": ".so", "metal": ".tar", "webgpu": ".tar"}
    for name, entry in m.targets.items():
        library = artifact / entry["library"]
        assert library.is_file() and library.stat().st_size == entry["size"] > 0
        assert library.suffix == suffix[name] and entry["device"] == name
        assert entry["tvm_target"]["kind"] == name
    if NVCC:
        assert m.targets["cuda"]["archs"] == ["sm_80", "sm_90"]
        assert m.targets["cuda"]["tvm_target"]["arch"] == "sm_80"  # scheduled for the lowest
    assert m.targets["metal"]["tvm_target"]["host"]["mtriple"].startswith("arm64-apple")
    assert len(m.shards) == 1  # one set of weights for all targets


@needs_nvcc
def test_cuda_library_holds_sass_for_each_arch_and_ptx(artifact):
    data = (artifact / "lib" / "cuda.so").read_bytes()
    entries = [e for fatbin in _fatbins(data) for e in fatbin]
    sass = {arch: payload for kind, arch, payload in entries if kind == _ELF}
    ptx = [arch for kind, arch, _ in entries if kind == _PTX]
    assert sorted(sass) == [80, 90], entries
    assert ptx == [80]  # PTX of the lowest arch: newer GPUs compile it once, at load
    kernels = {arch: _elf_kernels(elf) for arch, elf in sass.items()}
    assert kernels[80] == kernels[90] and kernels[80] == _wgsl_kernels(artifact)


@needs_nvcc
def test_cuda_library_loads_in_tvms_cuda_runtime(artifact):
    """As far as a machine without a GPU can go: TVM's CUDA runtime (in a separate process, with
    relaxlm's stand-in driver) deserializes the library's device module, which implements every
    kernel; kernels load into a GPU only at their first launch."""
    script = (
        "import sys, tvm\n"
        "from relaxlm.compiler.targets import _load_cuda_runtime\n"
        "_load_cuda_runtime()\n"
        "(device,) = tvm.runtime.load_module(sys.argv[1]).imports[0].imports\n"
        "names = sys.argv[2].split(',')\n"
        "print(device.kind, sum(device.implements_function(n) for n in names), len(names))\n"
    )
    kernels = ",".join(sorted(_wgsl_kernels(artifact)))
    library = str(artifact / "lib" / "cuda.so")
    result = subprocess.run(
        [sys.executable, "-c", script, library, kernels], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    kind, found, total = result.stdout.split()
    assert kind == "cuda" and found == total


def test_metal_library_holds_msl_for_every_kernel(artifact):
    members = _tar_members(artifact / "lib" / "metal.tar")
    assert sorted(members) == ["devc.o", "lib0.o"]
    for obj in members.values():  # Mach-O 64-bit, arm64 (CPU_TYPE_ARM64 = 0x0100000c)
        assert struct.unpack_from("<II", obj) == (0xFEEDFACF, 0x0100000C)
    msl = members["devc.o"].decode("latin-1")
    assert "#include <metal_stdlib>" in msl
    kernels = set(re.findall(r"kernel void (\w+)\(", msl))
    assert kernels == _wgsl_kernels(artifact)
    # The decode path's kernels are there: int4 dequantize-matmul and paged attention.
    assert any("dequantize_q4" in k for k in kernels)
    assert "batch_decode_paged_kv_kernel" in kernels


def test_inspect_shows_each_target_library_and_size(artifact):
    result = _relaxlm("inspect", str(artifact))
    assert result.returncode == 0, result.stderr
    rows = {
        line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("target")
    }
    assert set(rows) == BUILT
    if NVCC:
        assert "lib/cuda.so" in rows["cuda"] and "archs sm_80 sm_90" in rows["cuda"]
    for row in rows.values():
        assert re.search(r"\d+(\.\d)? (B|KiB|MiB)", row), row


def test_vulkan_without_spirv_codegen_is_a_clear_error(tmp_path, checkpoints):
    import tvm

    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None:
        pytest.skip("this TVM has SPIR-V codegen; the error path cannot be reached")
    result = _relaxlm(
        "compile", str(checkpoints("llama_gqa")), "-o", str(tmp_path / "vk"), "--target", "vulkan"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "target 'vulkan' needs a TVM built with Vulkan support" in result.stderr
    assert "USE_VULKAN=ON" in result.stderr
    assert not (tmp_path / "vk").exists()


@needs_nvcc
def test_runtime_picks_the_library_by_device_or_says_what_is_missing(artifact):
    import relaxlm
    from relaxlm.runtime.loader import library_for_device

    m = Manifest.read(artifact)
    assert library_for_device(artifact, m, "cuda:0").name == "cuda.so"
    assert library_for_device(artifact, m, "metal").name == "metal.tar"
    with pytest.raises(relaxlm.RelaxlmError, match=r"no library for device 'cpu'.*--target cpu"):
        relaxlm.LLM(str(artifact), device="cpu")
    with pytest.raises(relaxlm.RelaxlmError, match="'cuda:0' is not available on this machine"):
        relaxlm.LLM(str(artifact), device="cuda:0")


def test_target_specs_are_parsed_strictly():
    from relaxlm.compiler.targets import resolve_targets
    from relaxlm.errors import RelaxlmError

    presets = resolve_targets(["cuda:sm_90,sm_80,metal", "webgpu"])
    assert [p.name for p in presets] == ["cuda", "metal", "webgpu"]
    assert presets[0].archs == ("sm_80", "sm_90")
    assert resolve_targets("cuda")[0].archs == ("sm_80", "sm_90")
    # another machine's CPU, by LLVM's name: its features, not this one's
    assert resolve_targets("cpu:haswell")[0].tvm_target["mcpu"] == "haswell"
    # GPU libraries' host code must not use the build machine's CPU features.
    assert "mcpu" not in presets[0].tvm_target["host"]
    for bad, message in [
        ("cuda:80", "not a CUDA arch"),
        ("cuda,cuda:sm_90", "asked for twice"),
        ("rocm", "not supported"),
        ("cpu:haswel", "LLVM knows no CPU 'haswel' \\(did you mean haswell"),
    ]:
        with pytest.raises(RelaxlmError, match=message):
            resolve_targets(bad)


# -- reading the libraries --------------------------------------------------------------------


def _fatbins(data: bytes) -> list[list[tuple[int, int, bytes]]]:
    """Every fatbin in `data`: its entries as (kind, sm arch, payload).

    Layout (as cuobjdump reads it): header {u32 magic, u16 version, u16 header size, u64 size};
    entries {u16 kind, u16 version, u32 header size, u64 payload size, ..., u32 arch at 28}.
    """
    found = []
    start = data.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, start)
        pos, end, entries = start + header, start + header + size, []
        while pos < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
            arch = struct.unpack_from("<I", data, pos + 28)[0]
            body = data[pos + entry_header : pos + entry_header + payload]
            entries.append((kind, arch, body))
            pos += entry_header + payload
        found.append(entries)
        start = data.find(struct.pack("<I", FATBIN_MAGIC), end)
    assert found, "no fatbin in the CUDA library: device code was not compiled ahead of time"
    return found


def _elf_kernels(elf: bytes) -> set[str]:
    """Kernel names of a cubin: its `.text.<kernel>` sections."""
    assert elf[:4] == b"\x7fELF", "SASS entry is not an ELF cubin"
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * entsize) for i in range(count)]
    strtab = headers[names_index][4]  # sh_offset of the section-name table
    names = [elf[strtab + h[0] : elf.index(b"\0", strtab + h[0])].decode() for h in headers]
    return {n.removeprefix(".text.") for n in names if n.startswith(".text.")}


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _wgsl_kernels(artifact) -> set[str]:
    """Kernel names in the WebGPU library: the reference set (same scheduled module)."""
    wgsl = _tar_members(artifact / "lib" / "webgpu.tar")["devc.o"].decode("latin-1")
    names = set(re.findall(r"@compute @workgroup_size\([^)]*\)\s*fn (\w+)\(", wgsl))
    assert len(names) > 10, names
    return names


def test_manifest_targets_are_json_serialisable(artifact):
    data = json.loads((artifact / "manifest.json").read_text())
    assert data["format_version"] == 1  # entries only gained keys: older readers still work


def test_add_a_target_to_an_existing_artifact(artifact, checkpoints, tmp_path):
    """`--add` builds one more library over the same weights and keeps the others."""
    import shutil

    import relaxlm

    folder = tmp_path / "artifact"
    shutil.copytree(artifact, folder)
    before = Manifest.read(folder)
    model = str(checkpoints("llama_gqa"))
    result = _relaxlm(
        "compile", model, "-o", str(folder), "--quant", "q4", "--target", "cpu", "--add"
    )
    assert result.returncode == 0, result.stderr
    after = Manifest.read(folder)
    assert set(after.targets) == BUILT | {"cpu"}
    for name in BUILT:
        assert after.targets[name] == before.targets[name]
    assert after.shards == before.shards
    out = relaxlm.LLM(str(folder), device="cpu").generate(
        [[1, 2, 3]], relaxlm.SamplingParams(max_tokens=3, temperature=0)
    )
    assert len(out[0].token_ids) == 3

    # Other weights (here: not quantized) would not fit the libraries already there.
    result = _relaxlm("compile", model, "-o", str(folder), "--target", "cpu", "--add")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "weights differ" in result.stderr
    assert Manifest.read(folder).targets == after.targets  # left as it was


def test_metal_matmul_gets_the_generic_tiled_schedule():
    """dlight's MetalMatmul segfaults in TVM 0.27; the GPU rules must never reach it."""
    import tvm
    from tvm import te

    from relaxlm.compiler.schedules.gpu import gpu_schedules
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.tvm_api import tirx

    tokens = tirx.Var("tokens", "int32")
    x = te.placeholder((1, tokens, 256), "float16", name="x")
    w = te.placeholder((512, 256), "float16", name="w")
    k = te.reduce_axis((0, 256), name="k")
    y = te.compute(
        (1, tokens, 512), lambda b, i, j: te.sum(x[b, i, k] * w[j, k], axis=k), name="NT_matmul"
    )
    target = resolve_target("metal").target()
    with target:
        mod = gpu_schedules()(tvm.IRModule({"main": te.create_prim_func([x, w, y])}))
        assert mod["main"].attrs["tirx.is_scheduled"]
        library = tvm.compile(mod, target=target)
    msl = library.mod.imports[0].inspect_source()
    assert "threadgroup" in msl and "simdgroup" not in msl  # shared-memory tiles, no simdgroup

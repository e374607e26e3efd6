"""Tensor cores on CUDA, on a machine without a GPU: which kernels dlight's WMMA schedule takes
and what they compile to (compiler/schedules/gpu.py).

Prefill's float16 weight matmuls, and its q4 ones with the dequantize read into their
shared-memory tiles (compiler/fuse_dequantize_matmul.py), become WMMA kernels (dlight's, 128x128
tiles), and so do decode_batched's (compiler/batched_decode.py) in tiles of 32 rows
(compiler/schedules/few_rows.py); decode keeps DecodeGEMV, and bfloat16 (no WMMA intrinsic in
dlight) and dimensions of 64 or less keep the tiled schedule. The tiles' arithmetic without
WMMA is what tests/test_webgpu_kernels.py runs on lavapipe (prefill's GEMMs and few_rows.py's
loop nest); the WMMA instructions themselves need a GPU (scripts/gpu_check.py on a lent one).
"""

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from relaxlm.artifacts.library_gemm import BATCHED_DECODE
from relaxlm.compiler.pipeline import build_library
from relaxlm.compiler.quantization import resolve_scheme
from relaxlm.compiler.targets import resolve_target
from relaxlm.frontends import export
from relaxlm.testing.cuda_matrix import cuda_kernel_sources, fatbin_summary
from relaxlm.testing.ir import called_kernels

TARGET = "cuda:sm_80,sm_90"


@pytest.fixture(scope="module")
def scheduled(wide_llama):
    built = {}

    def get(dtype: str, quant: str):
        if (dtype, quant) not in built:
            mod, _, _ = build_library(
                export(wide_llama, dtype),
                resolve_target(TARGET),
                resolve_scheme(quant),
                scheduled_only=True,
            )
            built[dtype, quant] = mod
        return built[dtype, quant]

    return get


def _weight_matmuls(mod, function: str) -> dict[str, str]:
    """name -> TIR script of each weight-matmul kernel `function` calls."""
    return {name: mod[name].script() for name in called_kernels(mod, function, "NT_matmul")}


@pytest.mark.parametrize("quant", ["none", "q4"])
def test_prefill_matmuls_take_tensor_cores_and_decode_keeps_its_gemv(scheduled, quant):
    mod = scheduled("float16", quant)
    prefill, decode = _weight_matmuls(mod, "prefill"), _weight_matmuls(mod, "decode")
    batched = _weight_matmuls(mod, BATCHED_DECODE)  # batched_decode.py: the batch as rows
    # fused qkv, o (+ residual), fused gate/up, down (+ residual), the logits head
    assert len(prefill) == len(decode) == len(batched) == 5, (prefill, decode, batched)
    for name, script in {**prefill, **batched}.items():
        assert "T.tvm_mma_sync" in script and 'scope="wmma.matrix_b"' in script, name
    for name, script in decode.items():
        assert "wmma" not in script, name
    # decode_batched's in tiles of 32 rows (schedules/few_rows.py), prefill's of 128 (dlight's)
    assert not set(batched) & set(prefill)
    for name, script in batched.items():
        assert "T.int64(31)) // T.int64(32)" in script and "T.int64(127))" not in script, name
    for name, script in prefill.items():
        assert "T.int64(127)) // T.int64(128)" in script and "T.int64(31))" not in script, name
    if quant == "q4":
        for name, script in {**prefill, **batched}.items():
            # the packed weights dequantized as they are staged in shared memory, no float copy
            assert re.search(r'T.sblock\("dequantize_reindex(_pad)?_shared.dyn"\)', script), name
            assert 'T.sblock("dequantize")' not in script, name
        for name, script in decode.items():
            assert "dequantize_reindex" not in script, name  # DecodeGEMV's one reduction


def test_bfloat16_keeps_the_tiled_schedule(scheduled):
    mod = scheduled("bfloat16", "q4")
    prefill, decode = _weight_matmuls(mod, "prefill"), _weight_matmuls(mod, "decode")
    assert prefill and decode
    assert not any("wmma" in s for s in [*prefill.values(), *decode.values()])
    assert all('scope="shared"' in s for s in prefill.values())


def test_the_tensor_core_kernels_compile_to_wmma(wide_llama):
    """CUDA source (TVM's codegen) has the WMMA calls in prefill's kernels; where nvcc is
    installed, the fatbin for each arch has them too."""
    exported = export(wide_llama, "float16")
    executable, _, _ = build_library(
        exported, resolve_target(TARGET), resolve_scheme("q4"), device_binaries=False
    )
    ((device,),) = [m.imports for m in executable.mod.imports]
    source = device.inspect_source("")
    wmma = {name for name, body in cuda_kernel_sources(source).items() if "wmma::mma_sync" in body}
    # prefill's and decode_batched's 5 each, none shared (different tiles)
    assert len(wmma) == 10 and all("dequantize_q4" in n for n in wmma), sorted(wmma)
    if shutil.which("nvcc") is None:
        return
    executable, _, _ = build_library(
        exported, resolve_target(TARGET), resolve_scheme("q4"), device_binaries=True
    )
    with tempfile.TemporaryDirectory() as scratch:
        library = Path(scratch) / "cuda.so"
        executable.export_library(str(library))
        sass = fatbin_summary(library.read_bytes())["sass"]
    assert set(sass) == {"80", "90"}
    for arch, names in sass.items():
        assert wmma <= set(names), (arch, sorted(wmma - set(names)))

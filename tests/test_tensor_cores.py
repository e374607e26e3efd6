"""Tensor cores on CUDA, on a machine without a GPU: which kernels dlight's WMMA schedule takes
and what they compile to (compiler/schedules/gpu.py).

Prefill's float16 weight matmuls, and its q4 ones with the dequantize read into their
shared-memory tiles (compiler/fuse_dequantize_matmul.py), become WMMA kernels, and so do
decode_batched's (compiler/batched_decode.py); decode keeps DecodeGEMV, and bfloat16 (no WMMA
intrinsic in dlight) and dimensions of 64 or less keep the tiled schedule. The tiles'
arithmetic without WMMA is the GEMM tests/test_webgpu_kernels.py runs on lavapipe; the WMMA
instructions themselves need a GPU (scripts/gpu_check.py on a lent one).
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
from relaxlm.frontends import export, load_checkpoint
from relaxlm.testing.cuda_matrix import cuda_kernel_sources, fatbin_summary
from relaxlm.testing.ir import called_kernels
from relaxlm.testing.tiny_models import DEMO_CONFIG, make_model

TARGET = "cuda:sm_80,sm_90"


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A one-layer Llama whose weight dimensions all exceed 64 (dlight's tensor-core minimum):
    hidden 256, MLP 704, a vocabulary of a few hundred."""
    return load_checkpoint(
        make_model(tmp_path_factory.mktemp("wide"), base_config=DEMO_CONFIG, num_hidden_layers=1)
    )


@pytest.fixture(scope="module")
def scheduled(wide):
    built = {}

    def get(dtype: str, quant: str):
        if (dtype, quant) not in built:
            mod, _, _ = build_library(
                export(wide, dtype),
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


def test_the_tensor_core_kernels_compile_to_wmma(wide):
    """CUDA source (TVM's codegen) has the WMMA calls in prefill's kernels; where nvcc is
    installed, the fatbin for each arch has them too."""
    exported = export(wide, "float16")
    executable, _, _ = build_library(
        exported, resolve_target(TARGET), resolve_scheme("q4"), device_binaries=False
    )
    ((device,),) = [m.imports for m in executable.mod.imports]
    source = device.inspect_source("")
    wmma = {name for name, body in cuda_kernel_sources(source).items() if "wmma::mma_sync" in body}
    # prefill's and decode_batched's 5 each (TVM may share a kernel between the two)
    assert 5 <= len(wmma) <= 10 and all("dequantize_q4" in n for n in wmma), sorted(wmma)
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

"""Tensor cores on CUDA, on a machine without a GPU: which kernels dlight's WMMA schedule takes
and what they compile to (compiler/schedules/gpu.py).

Prefill's float16 weight matmuls, and its q4 ones with the dequantize read into their shared-memory
tiles (compiler/fuse_dequantize_matmul.py), become WMMA kernels; decode keeps DecodeGEMV, and
bfloat16 (no WMMA intrinsic in dlight) and dimensions of 64 or less keep the tiled schedule. The
tiles' arithmetic without WMMA is the GEMM tests/test_webgpu_kernels.py runs on lavapipe; the
WMMA instructions themselves need a GPU (scripts/gpu_check.py on a lent one).
"""

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from relaxlm.compiler.pipeline import build_library
from relaxlm.compiler.quantization import resolve_scheme
from relaxlm.compiler.targets import resolve_target
from relaxlm.frontends import export, load_checkpoint
from relaxlm.testing.cuda_matrix import cuda_kernel_sources, fatbin_summary
from relaxlm.testing.tiny_models import DEMO_CONFIG, make_model
from relaxlm.tvm_api import tirx

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


def _weight_matmuls(mod) -> dict[str, tuple[str, str]]:
    """name -> ("prefill" | "decode", TIR script) of each weight matmul kernel: prefill's rows
    are a dynamic token axis [1, n, k], decode's one per sequence [batch, 1, k]."""
    out = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or "NT_matmul" not in gv.name_hint:
            continue
        x = list(func.params[0].ty.shape)
        rows = "decode" if isinstance(x[-2], tirx.IntImm) and int(x[-2]) == 1 else "prefill"
        out[gv.name_hint] = rows, func.script()
    return out


@pytest.mark.parametrize("quant", ["none", "q4"])
def test_prefill_matmuls_take_tensor_cores_and_decode_keeps_its_gemv(scheduled, quant):
    kernels = _weight_matmuls(scheduled("float16", quant))
    prefill = {n: s for n, (rows, s) in kernels.items() if rows == "prefill"}
    decode = {n: s for n, (rows, s) in kernels.items() if rows == "decode"}
    # fused qkv, o (+ residual), fused gate/up, down (+ residual), the logits head
    assert len(prefill) == len(decode) == 5, sorted(kernels)
    for name, script in prefill.items():
        assert "T.tvm_mma_sync" in script and 'scope="wmma.matrix_b"' in script, name
    for name, script in decode.items():
        assert "wmma" not in script, name
    if quant == "q4":
        for name, script in prefill.items():
            # the packed weights dequantized as they are staged in shared memory, no float copy
            assert re.search(r'T.sblock\("dequantize_reindex(_pad)?_shared.dyn"\)', script), name
            assert 'T.sblock("dequantize")' not in script, name
        for name, script in decode.items():
            assert "dequantize_reindex" not in script, name  # DecodeGEMV's one reduction


def test_bfloat16_keeps_the_tiled_schedule(scheduled):
    kernels = _weight_matmuls(scheduled("bfloat16", "q4"))
    assert kernels and not any("wmma" in s for _, s in kernels.values())
    assert any('scope="shared"' in s for rows, s in kernels.values() if rows == "prefill")


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
    assert len(wmma) == 5 and all("dequantize_q4" in n for n in wmma), sorted(wmma)
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

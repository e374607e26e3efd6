"""The CUDA compile matrix (issue 17): every architecture the GPU path supports x {float32,
float16, bfloat16} x {none, q8, q4} builds for cuda:sm_80,sm_90 from a tiny config, on a
machine without a GPU.

Every cell goes through TVM's CUDA codegen (schedules, launch limits, TIR lowering: where the
H200 builds segfaulted or hit `cse_vN`); one cell per architecture also goes through nvcc, and
together they cover every dtype and quantization (`nvcc_cell`). Gemma 2 and 3 (sliding windows,
soft-capping) and Phi-3 at head_dim 24 (whose decode block TVM's kernel cannot launch) build
relaxlm's GPU attention kernels in place of TVM's, as do the two quantized-KV-cache cells
(`--kv-cache-dtype int8` on Llama, fp8 on Gemma 3's per-layer windows; CUDA source only).
Cells are built in child processes (relaxlm/testing/cuda_matrix.py), two at a time, so a
segfault fails its cell.

The suite builds the covering third of the matrix (`matrix_cells(full=False)`: every
architecture in every dtype, every dtype x quantization pair, every nvcc cell; 7.4 minutes on
2 free cores); RELAXLM_CUDA_MATRIX=full builds all of it (18.5 minutes). Only the selected cells are
built (`pytest -k qwen3`).
"""

import os
import shutil

import pytest

from relaxlm.compiler.sampling_kernels import sampling_kernels
from relaxlm.testing.cuda_matrix import Cell, matrix_cells, nvcc_cell, run_cells
from relaxlm.testing.gpu_cases import DIFFUSION_CASES, DTYPES, GPU_CASES, QUANTS

HAVE_NVCC = shutil.which("nvcc") is not None
FULL = os.environ.get("RELAXLM_CUDA_MATRIX") == "full"
CELLS = {cell.id: cell for cell in matrix_cells(nvcc=HAVE_NVCC, full=FULL)}


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory):
    """cell id -> result, for the cells the selected tests ask for."""
    wanted = [
        CELLS[item.callspec.params["cell"]]
        for item in request.session.items
        if item.module is request.module
        and "cell" in getattr(getattr(item, "callspec", None), "params", {})
    ]
    return run_cells(wanted, tmp_path_factory.mktemp("cuda-matrix"), workers=2)


COMPILING = list(CELLS.values())


@pytest.mark.parametrize("cell", [c.id for c in COMPILING if c.case not in DIFFUSION_CASES])
def test_compiles_for_cuda(cell, matrix):
    result = matrix[cell]
    assert result["ok"], f"{cell}: {result['error']}: {result['message']}"
    assert result["device_module"] == "cuda"
    if CELLS[cell].nvcc:  # SASS for both archs, PTX of the lowest, the same kernels in each
        fatbin = result["fatbin"]
        assert sorted(fatbin["sass"]) == ["80", "90"], fatbin
        assert fatbin["ptx"] == [80]
        assert fatbin["sass"]["80"] == fatbin["sass"]["90"] and len(fatbin["sass"]["80"]) > 10
        kernels = fatbin["sass"]["80"]
    else:  # CUDA source with its kernels (attention from TVM's cache, matmuls, norms)
        kernels = result["kernels"]
        assert len(kernels) > 10, kernels
        assert any(k.startswith("batch_decode_paged_kv") for k in kernels), kernels
        if CELLS[cell].kv_cache != "auto":  # packed rows in and out, merged as the dtype's
            for kernel in ("relaxlm_kv_pack", "relaxlm_kv_unpack", "tir_attention_merge_state"):
                assert f"{kernel}_kernel" in kernels, kernels
    # sampling on the GPU (compiler/sampling_kernels.py): every kernel of it, in every cell
    for name in sampling_kernels(1024):  # built once per process
        assert any(f"sampling_{name}" in k for k in kernels), (name, kernels)


DIFFUSION_ENTRIES = {
    "stable_diffusion": ["decode_latents", "denoise", "encode_text"],
    "flux": ["decode_latents", "denoise", "encode_text", "encode_text_2"],
}


@pytest.mark.parametrize("cell", [c.id for c in COMPILING if c.case in DIFFUSION_CASES])
def test_every_diffusion_component_compiles_for_cuda(cell, matrix):
    """Text encoders, denoiser and VAE decoder, each its own library with its kernels (the
    GPU schedules' matmuls, norms, convolutions): CUDA source, or SASS for sm_80 and sm_90."""
    result = matrix[cell]
    assert result["ok"], f"{cell}: {result['error']}: {result['message']}"
    assert result["device_module"] == "cuda"
    entries = result["entries"]
    assert sorted(entries) == DIFFUSION_ENTRIES[CELLS[cell].case]
    for name, kernels in entries.items():
        if CELLS[cell].nvcc:
            assert sorted(kernels["sass"]) == ["80", "90"] and kernels["ptx"] == [80], name
            kernels = kernels["sass"]["80"]
        assert len(kernels) >= 3, (name, kernels)


def test_nvcc_cells_cover_every_architecture_dtype_and_quantization():
    if not HAVE_NVCC:
        pytest.skip("nvcc is not on PATH: every cell is built to CUDA source only")
    pairs = [nvcc_cell(case) for case in GPU_CASES]
    assert set(pairs) == {(d, q) for d in DTYPES for q in QUANTS}
    assert [c.case for c in COMPILING if c.nvcc] == [*GPU_CASES, *DIFFUSION_CASES]


def test_the_covering_set_meets_every_case_dtype_and_quantization():
    """The suite's third of the matrix still builds every architecture in every dtype, every
    dtype x quantization pair, each case's nvcc cell, and each part of the full matrix."""
    full, covering = matrix_cells(full=True), matrix_cells(full=False)
    assert set(covering) <= set(full) and len(covering) < len(full) / 3
    gpu = [c for c in covering if c.case in GPU_CASES and c.kv_cache == "auto"]
    assert {(c.case, c.dtype) for c in gpu} == {(g, d) for g in GPU_CASES for d in DTYPES}
    assert {(c.dtype, c.quant) for c in gpu} == {(d, q) for d in DTYPES for q in QUANTS}
    assert [c for c in covering if c.nvcc] == [c for c in full if c.nvcc]
    assert {c.case for c in covering} == {c.case for c in full}


def test_a_crashing_cell_fails_alone(tmp_path, monkeypatch):
    """A child that dies (as a segfault would) fails the cell it was building; the cells after
    it are built by a fresh child."""
    import relaxlm.testing.cuda_matrix as cuda_matrix

    cells = [Cell("gpt2", "float32", "none"), Cell("gpt2", "float32", "q8")]
    real_run = cuda_matrix.subprocess.run
    calls = []

    def run(args, **kwargs):
        calls.append(kwargs["input"])
        if len(calls) == 1:  # the first child: starts the first cell, then dies
            return real_run(
                [
                    args[0],
                    "-c",
                    'import os; print(\'{"start": "gpt2-float32-none"}\'); '
                    "os.kill(os.getpid(), 11)",
                ],
                capture_output=True,
                text=True,
            )
        return real_run(args, **kwargs)

    monkeypatch.setattr(cuda_matrix.subprocess, "run", run)
    results = run_cells(cells, tmp_path, workers=1)
    assert results["gpt2-float32-none"]["error"] == "crash"
    assert "-11" in results["gpt2-float32-none"]["message"]
    assert results["gpt2-float32-q8"]["ok"], results["gpt2-float32-q8"]
    assert len(calls) == 2 and '"quant": "none"' not in calls[1]

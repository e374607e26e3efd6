"""`--gemm library`: prefill's weight matmuls handed to a GEMM library (compiler/library_gemm.py,
runtime/library_gemm.py, runtime/cublas.py).

On this machine the library is numpy's BLAS (the CPU's implementation of the same packed
function), so the graph rewrite, the dequantize it leaves unfused and the runtime's function are
checked end to end against transformers. cuBLAS itself needs a GPU: here its binding's
arguments are checked by handing them to a column-major BLAS nobody here wrote (the reference
Fortran `sgemm` interface of the OpenBLAS numpy ships, the interface `cublasGemmEx` copies),
and CUDA builds are checked to keep decode's kernels and call the library for prefill.
"""

import ctypes
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_clean_error, relaxlm_cli

from relaxlm.artifacts.library_gemm import BATCHED_DECODE, FUNCTION
from relaxlm.errors import RelaxlmError
from relaxlm.runtime import cublas, library_gemm  # noqa: F401 (registers FUNCTION)

SCRIPTS = Path(__file__).parent.parent / "scripts"
CASE = "llama_gqa"


def _calls(func_script: str) -> int:
    return func_script.count(f'"{FUNCTION}"')


@pytest.mark.parametrize(
    ("target", "dtype", "quant"),
    [
        ("cpu", "float32", "none"),
        ("cuda:sm_90", "float16", "none"),
        ("cuda:sm_90", "float16", "q4"),
        ("cuda:sm_90", "bfloat16", "q8"),
    ],
)
def test_prefill_calls_the_library_and_decode_keeps_its_kernels(checkpoints, target, dtype, quant):
    from relaxlm.compiler import pipeline
    from relaxlm.compiler.quantization import resolve_scheme
    from relaxlm.compiler.targets import resolve_target
    from relaxlm.frontends import export, load_checkpoint

    checkpoint = load_checkpoint(checkpoints(CASE))
    layers = checkpoint.config["num_hidden_layers"]
    mod, _, _ = pipeline.build_library(
        export(checkpoint, dtype),
        resolve_target(target),
        resolve_scheme(quant),
        scheduled_only=True,
        gemm="library",
    )
    prefill, decode = mod["prefill"].script(), mod["decode"].script()
    # per layer: fused q/k/v, o, fused gate/up, down; then the logits head
    assert _calls(prefill) == 4 * layers + 1
    assert _calls(decode) == 0
    assert "NT_matmul" not in prefill and "NT_matmul" in decode
    functions = {gv.name_hint for gv, _ in mod.functions_items()}
    if quant != "none":  # the weight is dequantized by a kernel of its own, then multiplied
        assert prefill.count(f"dequantize_{quant}") >= 4
        assert f"dequantize_{quant}_NT_matmul" in decode
        assert BATCHED_DECODE not in functions  # dequantizing every step would cost more
    elif target.startswith("cuda"):  # decode for many sequences through cuBLAS too
        assert _calls(mod[BATCHED_DECODE].script()) == 4 * layers + 1
    else:  # numpy's BLAS is slower than the CPU's decode kernels (README)
        assert BATCHED_DECODE not in functions


def test_relaxlm_compile_builds_a_cuda_library_with_nvcc(checkpoints, tmp_path):
    """`relaxlm compile --target cuda --gemm library` end to end (nvcc, in its own process): the
    fatbin has the prefill's dequantize kernels and decode's, and the manifest says `gemm`."""
    from relaxlm.artifacts import Manifest
    from relaxlm.testing.cuda_matrix import fatbin_summary

    out = tmp_path / "cuda"
    proc = relaxlm_cli(
        "compile",
        checkpoints(CASE),
        "-o",
        out,
        "--target",
        "cuda:sm_90",
        "--dtype",
        "float16",
        "--quant",
        "q4",
        "--gemm",
        "library",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = Manifest.read(out).targets["cuda"]
    assert entry["gemm"] == "library"
    kernels = fatbin_summary((out / entry["library"]).read_bytes())["sass"]["90"]
    assert any(k.startswith("dequantize_q4") and "matmul" not in k for k in kernels), kernels
    assert any("dequantize_q4_NT_matmul" in k for k in kernels), kernels  # decode's
    assert "GEMMs in library" in relaxlm_cli("inspect", out).stdout


def test_logits_equal_transformers_through_the_gpu_check(tmp_path):
    """scripts/gpu_check.py with --gemm library on the CPU: logits after prefill and decode
    against transformers, greedy tokens, a batch equal to each alone, seeded sampling."""
    folder = tmp_path / "check"
    compile_cmd = [sys.executable, str(SCRIPTS / "gpu_check.py"), "--compile-only", str(folder)]
    compile_cmd += ["--target", "cpu", "--cases", "llama", "--dtypes", "float32"]
    compile_cmd += ["--gemm", "library"]
    compiled = subprocess.run(compile_cmd, capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    artifact = folder / "llama-float32-library" / "artifact"
    from relaxlm.artifacts import Manifest

    assert Manifest.read(artifact).targets["cpu"]["gemm"] == "library"
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_check.py"), "--run-only", str(folder)]
        + ["--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    (row,) = [line.split() for line in run.stdout.splitlines()[3:]]
    assert row[:2] == ["llama-library", "float32"] and row[-1] == "ok", run.stdout
    assert row[5] == "16/16", run.stdout  # float32: every greedy token equal


def test_a_quantized_prefill_equals_the_fused_kernels(checkpoints):
    """q4 through dequantize + the library against the fused dequantize-matmul kernels: the
    same weights, summed in another order."""
    import relaxlm
    from relaxlm.testing.parity import token_ids

    fused = relaxlm.LLM(str(checkpoints(CASE)), quant="q4")
    library = relaxlm.LLM(str(checkpoints(CASE)), quant="q4", gemm="library")
    assert library.manifest.targets["cpu"]["gemm"] == "library"
    assert "gemm" not in fused.manifest.targets["cpu"]
    ids = token_ids(fused.vocab_size, 40)
    ours, theirs = library.score(ids, prefill=34), fused.score(ids, prefill=34)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.ptp(theirs)


# -- cuBLAS's arguments, against a column-major BLAS --------------------------------------------


@functools.cache
def _fortran_sgemm():
    """The Fortran `sgemm` of the OpenBLAS in numpy's wheel (64-bit integers: `_64_` names)."""
    (path,) = (Path(np.__file__).parent.parent / "numpy.libs").glob("libscipy_openblas64_*.so")
    sgemm = ctypes.CDLL(str(path)).scipy_sgemm_64_
    sgemm.restype = None
    return sgemm


def _run_blas(call: cublas.Gemm) -> None:
    i64, f32 = ctypes.c_int64, ctypes.c_float
    _fortran_sgemm()(
        ctypes.c_char_p(call.transa.encode()),
        ctypes.c_char_p(call.transb.encode()),
        ctypes.byref(i64(call.m)),
        ctypes.byref(i64(call.n)),
        ctypes.byref(i64(call.k)),
        ctypes.byref(f32(1.0)),
        ctypes.c_void_p(call.a),
        ctypes.byref(i64(call.lda)),
        ctypes.c_void_p(call.b),
        ctypes.byref(i64(call.ldb)),
        ctypes.byref(f32(0.0)),
        ctypes.c_void_p(call.c),
        ctypes.byref(i64(call.ldc)),
        ctypes.c_size_t(1),  # gfortran's hidden lengths of the two character arguments
        ctypes.c_size_t(1),
    )


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 5, 3), (7, 4, 9), (33, 16, 8), (64, 3, 130)])
def test_cublas_arguments_make_blas_compute_x_times_w_transposed(rows, n, k):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    out = np.full((rows, n), np.nan, np.float32)
    call = cublas.nt_gemm(rows, n, k, x.ctypes.data, w.ctypes.data, out.ctypes.data)
    _run_blas(call)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)


def test_the_blas_check_fails_on_a_wrong_mapping():
    """The same check with the operands' roles swapped (B = w, A = x) computes something else."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4), dtype=np.float32)
    w = rng.standard_normal((6, 4), dtype=np.float32)
    out = np.zeros((6, 6), np.float32)
    right = cublas.nt_gemm(6, 6, 4, x.ctypes.data, w.ctypes.data, out.ctypes.data)
    wrong = cublas.Gemm(**{**right.__dict__, "a": right.b, "b": right.a})
    _run_blas(wrong)
    assert not np.allclose(out, x @ w.T, atol=1e-3)


# -- errors ---------------------------------------------------------------------------------------


def test_the_wheels_cublas_loads_and_without_a_gpu_a_gemm_is_one_clear_error(monkeypatch):
    """The `cuda` extra's libcublas (the `nvidia-cublas` wheel) has every call the binding
    makes; on this machine, without a driver, a GEMM stops with a RelaxlmError."""
    monkeypatch.delenv("RELAXLM_CUBLAS_LIBRARY", raising=False)
    monkeypatch.setattr(cublas, "_LIBRARY", None)
    lib = cublas.library()
    assert Path(lib._name).name == "libcublas.so.13" and "nvidia" in lib._name
    for call in ("cublasCreate_v2", "cublasSetStream_v2", "cublasGemmEx"):
        assert getattr(lib, call)
    assert lib.cublasGetStatusString(1) == b"the library was not initialized"
    with pytest.raises(RelaxlmError, match="CUDA driver"):
        cublas.gemm(cublas.nt_gemm(2, 2, 2, 0, 0, 0), "float16", 0, 0)


def test_a_missing_cublas_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("RELAXLM_CUBLAS_LIBRARY", str(tmp_path / "libcublas.so.13"))
    monkeypatch.setattr(cublas, "_LIBRARY", None)
    with pytest.raises(RelaxlmError, match=r"relaxlm\[cuda\].*--gemm tir"):
        cublas.library()


def test_the_packed_function_refuses_shapes_that_do_not_multiply():
    import tvm

    gemm = tvm.get_global_func(FUNCTION)
    x = tvm.runtime.tensor(np.ones((1, 3, 4), np.float32))
    w = tvm.runtime.tensor(np.ones((5, 4), np.float32))
    out = tvm.runtime.empty((1, 3, 6), "float32")
    with pytest.raises(RelaxlmError, match="does not make"):
        gemm(x, w, out)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--dtype", "bfloat16"], ["float32", "bfloat16", "--gemm tir"]),
        (["--target", "metal"], ["metal", "--gemm tir"]),
        (["--tensor-parallel", "2"], ["one device"]),
    ],
)
def test_unsupported_combinations_are_one_clear_error(checkpoints, tmp_path, options, words):
    proc = relaxlm_cli(
        "compile", checkpoints(CASE), "-o", tmp_path / "out", "--gemm", "library", *options
    )
    assert_clean_error(proc, *words)
    assert not (tmp_path / "out").exists()

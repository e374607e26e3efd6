"""The decode GEMV schedule (compiler/schedules/decode_gemv.py): run as WGSL on lavapipe
against numpy, its CUDA code, and which of a tiny Llama's kernels take it.

The kernels are built as FuseDequantizeMatmul builds them (`dequantize_te` over the packed
parts quantize() writes), at shapes the tiny Llama does not have: K = 320 is not a multiple
of a warp's 1024-k step (nor of the 4-bit layout's 128), N = 70 not of the 4 rows a
workgroup takes.
"""

import math
import shutil
import subprocess

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import te, topi

from relaxlm.compiler.quantization import dequantize, quantize, resolve_scheme
from relaxlm.compiler.quantize_weights import dequantize_te
from relaxlm.compiler.schedules.decode_gemv import MAX_GRID_Y
from relaxlm.compiler.schedules.gpu import gpu_schedules
from relaxlm.compiler.targets import resolve_target
from relaxlm.testing.ir import called_kernels
from relaxlm.tvm_api import tirx

N, K = 70, 320
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (1e-2, 2e-2)}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _i64(value: int) -> tirx.IntImm:
    return tirx.IntImm("int64", value)


def _parts(scheme_name: str | None, w: np.ndarray) -> list[np.ndarray]:
    if scheme_name is None:
        return [w]
    return quantize(resolve_scheme(scheme_name), w.astype("float32"), w.dtype)


def decode_matmul(
    scheme_name: str | None, dtype: str, epilogue: str, n: int = N, k: int = K
) -> tirx.PrimFunc:
    """y[b, 0, n] = sum_k x[b, 0, k] * w(n, k) over a symbolic batch b, the decode kernel's
    shape, then the epilogue with r[b, 0, n]: "" none, "add" y + r, "silu" silu(y) * r (three
    blocks, as Relax fuses it); w dequantized from `scheme_name`'s parts, or a float weight."""
    batch = tirx.Var("batch_size", "int64")
    x = te.placeholder((batch, _i64(1), _i64(k)), dtype, name="x")
    packed = _parts(scheme_name, np.zeros((n, k), dtype))
    parts = [
        te.placeholder([_i64(d) for d in p.shape], str(p.dtype), name=f"w{i}")
        for i, p in enumerate(packed)
    ]
    if scheme_name is None:
        weight = lambda n, k: parts[0][n, k]  # noqa: E731
    else:
        scheme = resolve_scheme(scheme_name)
        weight = lambda n, k: dequantize_te(scheme, parts, n, k, dtype)  # noqa: E731
    r = te.reduce_axis((0, _i64(k)), name="k")
    y = te.compute(
        (batch, _i64(1), _i64(n)),
        lambda b, o, n: te.sum(x[b, o, r] * weight(n, r), axis=r),
        name="NT_matmul",
    )
    args = [x, *parts]
    if epilogue:
        r = te.placeholder((batch, _i64(1), _i64(n)), dtype, name="r")
        y = topi.add(y, r) if epilogue == "add" else topi.multiply(silu(y), r)
        args.append(r)
    return te.create_prim_func([*args, y])


def silu(y: te.Tensor) -> te.Tensor:
    return topi.multiply(y, topi.sigmoid(y))


def _epilogue(epilogue: str, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    if not epilogue:
        return y
    return y + r if epilogue == "add" else y / (1 + np.exp(-y)) * r


def _scheduled(func: tirx.PrimFunc, target) -> tirx.PrimFunc:
    with target:
        mod = gpu_schedules()(tvm.IRModule({"main": func}))
    return mod["main"]


@pytest.fixture(scope="module")
def gpu():
    from wgsl_harness import NoAdapter, webgpu_device

    try:
        device, _ = webgpu_device()
    except NoAdapter as e:
        pytest.skip(f"no WebGPU adapter: {e}")
    return device


def _run(gpu, scheme_name, dtype, rows, epilogue, packed=None):
    """The scheduled kernel's output on `rows` sequences, and numpy's."""
    from wgsl_harness import WebGPUFunction

    target = resolve_target("webgpu").target()
    func = _scheduled(decode_matmul(scheme_name, dtype, epilogue), target)
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 1, K)).astype(dtype)
    w = (rng.standard_normal((N, K)) / math.sqrt(K)).astype(dtype)
    parts = packed if packed is not None else _parts(scheme_name, w)
    if scheme_name is None:
        w_ref = w.astype(np.float64)
    else:
        w_ref = dequantize(resolve_scheme(scheme_name), _parts(scheme_name, w), K)
    want = x.astype(np.float64) @ w_ref.astype(np.float64).T
    names = [p.name for p in func.params]
    args = {names[0]: x, **dict(zip(names[1 : 1 + len(parts)], parts, strict=True))}
    if epilogue:
        args[names[-2]] = rng.standard_normal((rows, 1, N)).astype(dtype)
        want = _epilogue(epilogue, want, args[names[-2]].astype(np.float64))
    args[names[-1]] = np.zeros((rows, 1, N), dtype)
    return WebGPUFunction(func, target, gpu)(**args)[names[-1]], want


@pytest.mark.parametrize(
    "scheme_name, dtype, rows, epilogue",
    [
        ("q4", "float32", 1, ""),
        ("q4", "float16", 3, "add"),
        ("q4", "float32", 17, "silu"),
        ("q4-asym", "float16", 5, "add"),  # a zero point per 128 k
        (None, "float16", 1, "add"),
        (None, "float32", 17, ""),
    ],
)
def test_decode_gemv_matches_numpy_on_webgpu(gpu, scheme_name, dtype, rows, epilogue):
    got, want = _run(gpu, scheme_name, dtype, rows, epilogue)
    rtol, atol = TOLERANCE[dtype]
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)


def test_a_misread_nibble_fails_the_check(gpu):
    """The same check on words whose nibbles are rotated by one (what a schedule that
    unpacked nibble j + 1 for j would compute) fails: the oracle sees the layout."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((N, K)) / math.sqrt(K)).astype("float32")
    words, *scales = _parts("q4", w)
    rotated = (words >> np.uint32(4)) | (words << np.uint32(28))
    got, want = _run(gpu, "q4", "float32", 1, "", packed=[rotated, *scales])
    assert not np.allclose(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "scheme_name, dtype, epilogue", [("q4", "float16", "add"), (None, "float16", "silu")]
)
def test_cuda_code_loads_128_bits_and_sums_by_shuffles(scheme_name, dtype, epilogue, tmp_path):
    """TVM's CUDA source for the kernel, then nvcc on it where the toolkit is installed."""
    target = resolve_target("cuda:sm_90").target()
    func = _scheduled(decode_matmul(scheme_name, dtype, epilogue), target)
    source = _cuda_source(tvm.IRModule({"main": func}), target)
    assert "__launch_bounds__(128)" in source  # 4 rows x 32 lanes
    assert "*(uint4*)(w0_local_ptr + 0) = *(uint4*)(w0_ptr" in source
    assert "__shfl_down_sync" in source
    if shutil.which("nvcc"):
        (tmp_path / "gemv.cu").write_text(source)
        nvcc = ["nvcc", "-arch=sm_90", "-cubin", "-o", "gemv.cubin", "gemv.cu"]
        built = subprocess.run(nvcc, cwd=tmp_path, capture_output=True, text=True)
        assert built.returncode == 0, built.stderr
        assert (tmp_path / "gemv.cubin").stat().st_size > 0


@pytest.mark.parametrize(
    "n, tiles",
    [(N, "blockIdx.x"), (4 * MAX_GRID_Y, "blockIdx.x"), (4 * MAX_GRID_Y + 4, "blockIdx.y")],
)
def test_batch_tiles_of_a_row_group_launch_together(n, tiles):
    """The batch tiles go along x, the row groups along y (launch order is x first: the tiles
    that read the same weights run together), unless there are more row groups than the grid
    takes along y (a vocabulary of more than 4 x 65535 rows)."""
    target = resolve_target("cuda:sm_90").target()
    script = _scheduled(decode_matmul(None, "float16", "", n=n, k=128), target).script()
    groups = "blockIdx.y" if tiles == "blockIdx.x" else "blockIdx.x"
    assert f'T.thread_binding((batch_size + T.int64(3)) // T.int64(4), thread="{tiles}")' in script
    assert f'T.thread_binding(T.int64({-(-n // 4)}), thread="{groups}")' in script


def _cuda_source(mod: tvm.IRModule, target) -> str:
    """The CUDA source TVM generates for `mod`. Without TVM's CUDA plugin in this process TVM
    keeps it as the module's source; once an earlier test loaded the plugin (any CUDA build
    with binaries), TVM hands it to `tvm_callback_cuda_compile`, which this build replaces by
    one that keeps it."""
    kept = []

    def keep(code, *_):
        kept.append(code)
        return bytearray(code.encode())

    original = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", keep, override=True)
    try:
        with target:
            library = tvm.compile(mod, target=target)
    finally:
        if original is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", original, override=True)
        else:
            tvm_ffi.remove_global_func("tvm_callback_cuda_compile")
    return kept[0] if kept else library.mod.imports[0].inspect_source()


@pytest.mark.parametrize("quant", ["q4", "none"])
def test_tiny_llamas_decode_matmuls_take_it_for_cuda(checkpoints, quant):
    """The decode step's five weight matmuls (q, k, v fused; o + residual; gate/up fused;
    down + residual; lm_head + cast) take DecodeGEMV; prefill's keep their schedules."""
    from relaxlm.compiler.pipeline import build_library
    from relaxlm.frontends import export, load_checkpoint

    exported = export(load_checkpoint(checkpoints("llama_gqa")), "float16")
    scheme = resolve_scheme(quant)
    mod, _, _ = build_library(exported, resolve_target("cuda:sm_90"), scheme, scheduled_only=True)
    decode, prefill = (
        [mod[name].script() for name in called_kernels(mod, function, "NT_matmul")]
        for function in ("decode", "prefill")
    )
    assert len(decode) == len(prefill) == 5
    vector = 4 if quant == "q4" else 8  # 128 bits: 4 words, 8 float16s
    for script in decode:
        assert _gemv_threads(script)
        assert f"T.vectorized(T.int64({vector}))" in script
    assert not any(_gemv_threads(script) for script in prefill)


def _gemv_threads(script: str) -> bool:
    """4 rows x 32 lanes a workgroup, batch tiles of 4 along x: DecodeGEMV's layout."""
    return all(
        s in script
        for s in (
            'T.thread_binding(T.int64(4), thread="threadIdx.y")',
            'T.thread_binding(T.int64(32), thread="threadIdx.x")',
            'T.thread_binding((batch_size + T.int64(3)) // T.int64(4), thread="blockIdx.x")',
        )
    )

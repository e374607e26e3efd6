"""The GPU-scheduled kernels, run as WGSL on a real WebGPU implementation, against numpy.

CUDA, Metal, Vulkan and WebGPU share one TIR schedule per kernel (compiler/schedules/gpu.py);
only codegen differs. WebGPU is the one GPU target this machine can execute: `wgpu` runs the
WGSL TVM emits on Mesa's lavapipe (a Vulkan driver on the CPU). So a schedule bug - a wrong
thread binding, a missing barrier in a cross-thread reduction, a bad split - fails here.

The kernels are the ones the pipeline really builds: a tiny Llama taken through phases 1-3 of
`build_library` for the webgpu preset (q4 and float32), plus softmax, which Llama's graph has
no kernel for, scheduled by the same rules. wgsl_harness.py plays TVM's web runtime.
"""

import math
import re

import numpy as np
import pytest
import tvm
from tvm import te, topi

from relaxlm.artifacts.library_gemm import BATCHED_DECODE
from relaxlm.compiler.pipeline import build_library
from relaxlm.compiler.quantization import dequantize, quantize, resolve_scheme
from relaxlm.compiler.schedules.few_rows import FEW_ROWS, FewRowsMatmul
from relaxlm.compiler.schedules.gpu import CapVectorLanes, gpu_schedules
from relaxlm.compiler.targets import resolve_target
from relaxlm.frontends import export, load_checkpoint
from relaxlm.testing.ir import called_kernels
from relaxlm.tvm_api import tirx

# (rtol, atol) by the kernels' dtype; references are float64 over the same (rounded) inputs.
# float16: a few of the output's roundings. GPU builds sum float16 linears in float32
# (compiler/float32_accumulation.py); summed in float16 the 704-deep GEMM of
# test_few_rows_gemm_tiles was off by 2.5e-2, and fails this.
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (4e-3, 4e-3)}
DTYPES = ["float32", "float16"]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def gpu():
    from wgsl_harness import NoAdapter, webgpu_device

    try:
        device, info = webgpu_device()
    except NoAdapter as e:
        pytest.skip(f"no WebGPU adapter: {e}")
    print(f"WebGPU adapter: {info['device']} ({info['backend_type']})")
    return device


@pytest.fixture(scope="module")
def preset():
    return resolve_target("webgpu")


@pytest.fixture(scope="module")
def scheduled(checkpoints, preset):
    """(quant, dtype) -> the tiny Llama's scheduled IRModule for webgpu; and its config."""
    checkpoint = load_checkpoint(checkpoints("llama_gqa"))
    out, config = {}, None
    for dtype in DTYPES:
        exported = export(checkpoint, dtype)
        config = exported.config
        for quant in ("q4", "none"):
            scheme = resolve_scheme(quant)
            mod, _, _ = build_library(exported, preset, scheme, scheduled_only=True)
            out[quant, dtype] = mod
    return out, config


def _kernel(mod: tvm.IRModule, want) -> tirx.PrimFunc:
    """The first PrimFunc (by name) for which want(name, [param shapes]) holds."""
    for gv in sorted(mod.get_global_vars(), key=lambda g: g.name_hint):
        func = mod[gv]
        if isinstance(func, tirx.PrimFunc) and want(gv.name_hint, _shapes(func)):
            assert func.attrs and func.attrs.get("tirx.is_scheduled"), gv.name_hint
            return func
    raise AssertionError(f"no kernel matches in {[g.name_hint for g in mod.get_global_vars()]}")


def _shapes(func: tirx.PrimFunc) -> list:
    return [list(p.ty.shape) if isinstance(p.ty, tirx.BufferType) else None for p in func.params]


def _static(dim) -> bool:
    return isinstance(dim, tirx.IntImm)


def _run(gpu, preset, func, **args):
    from wgsl_harness import WebGPUFunction

    return WebGPUFunction(func, preset.target(), gpu)(**args)


def _names(func) -> list[str]:
    return [p.name for p in func.params]


def _check(name: str, got: np.ndarray, want: np.ndarray, tolerance=None) -> None:
    rtol, atol = tolerance or TOLERANCE[str(got.dtype)]
    err = float(np.abs(got.astype(np.float64) - want).max())
    print(f"{name} ({got.dtype}): max |error| {err:.2e} over {want.size} values")
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def few_rows_kernels(wide_llama):
    """name -> decode_batched's q4 float16 weight GEMMs of a CUDA build (several tiles in every
    dimension: DEMO_CONFIG widths), fused and marked for few_rows.py, not yet scheduled."""
    mod, _, _ = build_library(
        export(wide_llama, "float16"),
        resolve_target("cuda:sm_90"),
        resolve_scheme("q4"),
        fused_only=True,
    )
    names = called_kernels(mod, BATCHED_DECODE, "NT_matmul")
    return {name: mod[name] for name in names if FEW_ROWS in mod[name].attrs}


def _linear(gpu, preset, func, rows: int, scheme_name: str | None, dtype: str):
    """Run a linear kernel x[.., K] @ W[N, K]^T (packed for `scheme_name`) on `rows` rows."""
    x_shape, *part_shapes, out_shape = _shapes(func)
    n, k = int(out_shape[-1]), int(x_shape[-1])
    rng = np.random.default_rng(rows)
    x_dims = [rows if not _static(d) else int(d) for d in x_shape]
    x = rng.standard_normal(x_dims).astype(dtype)
    w = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(dtype)
    if scheme_name is None:
        parts, w_ref = [w], w.astype(np.float64)
    else:
        scheme = resolve_scheme(scheme_name)
        parts = quantize(scheme, w.astype("float32"), np.dtype(dtype))
        w_ref = dequantize(scheme, parts, k).astype(np.float64)  # the exact weights packed
    assert [list(p.shape) for p in parts] == [[int(d) for d in s] for s in part_shapes]
    out_dims = [*x_dims[:-1], n]
    names = _names(func)
    args = {names[0]: x, **dict(zip(names[1:-1], parts, strict=True))}
    out_dtype = str(func.params[-1].ty.dtype)  # a float32 cast after the logits head
    out = _run(gpu, preset, func, **args, **{names[-1]: np.zeros(out_dims, out_dtype)})
    return out[names[-1]], x.astype(np.float64) @ w_ref.T


def _is_linear(quant: str, decode: bool):
    def want(name, shapes) -> bool:
        # a 16-bit one is fused with its cast back from float32 (float32_accumulation.py)
        if not re.fullmatch(r"(fused_)?(dequantize_q4_)?NT_matmul\d*(_cast\d*)?", name):
            return False
        if ("dequantize_q4" in name) != (quant == "q4") or len(shapes) != (4 if quant else 3):
            return False
        x = shapes[0]
        return len(x) == 3 and (not _static(x[0]) if decode else not _static(x[1]))

    return want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_dequantize_gemv(gpu, preset, scheduled, rows, dtype):
    """Decode: the fused q4 dequantize-GEMV (DecodeGEMV: a warp per output row, 4 words a lane
    and step, a cross-lane sum), 1 and 3 sequences."""
    mods, _ = scheduled
    func = _kernel(mods["q4", dtype], _is_linear("q4", decode=True))
    got, want = _linear(gpu, preset, func, rows, "q4", dtype)
    _check(f"q4 dequantize-GEMV, {rows} row(s)", got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_dequantize_gemm(gpu, preset, scheduled, dtype):
    """Prefill: the q4 dequantize-matmul over 37 tokens (dlight Matmul: the dequantize inlined
    into the shared-memory tile loads of the weight)."""
    mods, _ = scheduled
    func = _kernel(mods["q4", dtype], _is_linear("q4", decode=False))
    assert 'T.sblock("dequantize_reindex_shared")' in func.script()
    got, want = _linear(gpu, preset, func, 37, "q4", dtype)
    _check("q4 dequantize-GEMM, 37 tokens", got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm(gpu, preset, scheduled, dtype):
    """Prefill: a weight GEMM (dlight Matmul: shared-memory tiles), 37 tokens (not a tile
    multiple)."""
    mods, _ = scheduled
    func = _kernel(mods["none", dtype], _is_linear("", decode=False))
    got, want = _linear(gpu, preset, func, 37, None, dtype)
    _check("GEMM, 37 tokens", got, want)


@pytest.mark.parametrize("rows, warps", [(32, 2), (16, 4)])
def test_few_rows_gemm_tiles(gpu, preset, few_rows_kernels, rows, warps):
    """decode_batched's q4 CUDA GEMMs (FewRowsMatmul: row tiles of `rows`, `warps` warps of 16
    columns, 64-deep pipelined steps through shared memory, the dequantize in the weight's tile
    loads, a float32 sum cast back), built with their 16x16x16 fragments left as loops: the
    WMMA kernel's tiling, padding and loads, run here; 37 sequences: row tiles, the last
    padded. The default tile (32 rows, 4 warps) needs 35 KB of workgroup memory, lavapipe has
    32: these two split it, 2 warps of two fragments each, and 4 warps of one. (The float16
    kernels are the same nest without the dequantize; both their parameters are named `lv`,
    which the harness, binding arrays by name, cannot run.)"""
    kernels = few_rows_kernels
    # fused qkv, o, fused gate/up, down (11 steps of 64), the logits head (cast to float32)
    assert len(kernels) == 5, sorted(kernels)
    rule = CapVectorLanes(FewRowsMatmul(tensor_cores=False, rows=rows, warps=warps))
    for name, func in sorted(kernels.items()):
        with preset.target():
            sch = rule.apply(func, preset.target(), False)
        assert sch is not None, name
        scheduled = sch.mod["main"]
        assert f"T.int64({rows - 1})) // T.int64({rows})" in scheduled.script(), name
        got, want = _linear(gpu, preset, scheduled, 37, "q4", "float16")
        _check(f"{name}, 37 sequences", got, want)


def test_gemv(gpu, preset, scheduled):
    """Decode: a float32 weight matmul of 2 rows (DecodeGEMV)."""
    mods, _ = scheduled
    func = _kernel(mods["none", "float32"], _is_linear("", decode=True))
    got, want = _linear(gpu, preset, func, 2, None, "float32")
    _check("GEMV, 2 rows", got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decode", [True, False])
def test_rms_norm(gpu, preset, scheduled, decode, dtype):
    """RMSNorm (dlight RMSNorm, vectors capped at 4 lanes for WGSL), decode and prefill shapes."""
    mods, config = scheduled
    func = _kernel(
        mods["q4", dtype],
        lambda n, s: n.startswith("rms_norm") and not _static(s[0][0 if decode else 1]),
    )
    x_shape = _shapes(func)[0]
    hidden = int(x_shape[-1])
    dims = [5, 1, hidden] if decode else [1, 21, hidden]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(dims).astype(dtype)
    w = rng.standard_normal(hidden).astype(dtype)
    names = _names(func)
    out = _run(gpu, preset, func, **{names[0]: x, names[1]: w, names[2]: np.zeros_like(x)})
    x64 = x.astype(np.float64)
    eps = config.get("rms_norm_eps", 1e-6)
    want = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w
    _check("RMSNorm", out[names[2]], want)


def test_softmax(gpu, preset):
    """Softmax over the last axis, as LegalizeOps emits it (topi), under the GPU rules."""
    rows = tirx.Var("rows", "int64")
    x = te.placeholder((rows, 480), "float32", name="x")
    func = te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])
    target = preset.target()
    with target:
        mod = gpu_schedules()(tvm.IRModule({"softmax": func}))
    func = mod["softmax"]
    data = (np.random.default_rng(2).standard_normal((7, 480)) * 4).astype("float32")
    names = _names(func)
    out = _run(gpu, preset, func, **{names[0]: data, names[1]: np.zeros_like(data)})
    e = np.exp(data - data.max(-1, keepdims=True))
    _check("softmax", out[names[1]], e / e.sum(-1, keepdims=True), tolerance=(1e-4, 1e-6))


def _rotate(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """HF rotate-half RoPE on x [tokens, heads, d] at positions pos [tokens]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d / 2]
    angle = pos[:, None].astype(np.float64) * inv[None, :]  # [tokens, d / 2]
    cos = np.concatenate([np.cos(angle)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(angle)] * 2, -1)[:, None, :]
    half = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(gpu, preset, scheduled, dtype):
    """The KV cache's split + rotary kernel on fused qkv: q and k rotated, v copied."""
    mods, config = scheduled
    func = _kernel(mods["q4", dtype], lambda n, s: n == "tir_split_rotary")
    qkv_shape, _, q_shape, k_shape, _, _ = _shapes(func)
    heads, d = int(qkv_shape[1]), int(qkv_shape[2])
    hq, hkv = int(q_shape[1]), int(k_shape[1])
    tokens = 11
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((tokens, heads, d)).astype(dtype)
    pos = rng.permutation(200)[:tokens].astype("int32")  # positions in any order
    names = _names(func)
    zeros = {
        n: np.zeros((tokens, h, d), dtype) for n, h in zip(names[2:5], (hq, hkv, hkv), strict=True)
    }
    out = _run(gpu, preset, func, **{names[0]: qkv, names[1]: pos}, **zeros, **{names[5]: 1})
    theta = config.get("rope_theta", 10000.0)
    x = qkv.astype(np.float64)
    _check("rotary q", out[names[2]], _rotate(x[:, :hq], pos, theta))
    _check("rotary k", out[names[3]], _rotate(x[:, hq : hq + hkv], pos, theta))
    _check("rotary v (copied)", out[names[4]], x[:, hq + hkv :], tolerance=(0, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_decode(gpu, preset, scheduled, dtype):
    """TVM's paged-KV decode attention kernel built for WebGPU: 3 sequences of 1, 16 and 37
    cached tokens in scattered 16-token pages, GQA, against softmax(q k^T * scale) v."""
    mods, _ = scheduled
    func = _kernel(mods["q4", dtype], lambda n, s: n == "tir_attention_decode")
    q_shape, pages_shape = _shapes(func)[:2]
    hq, d = int(q_shape[1]), int(q_shape[2])
    _, _, hkv, page, _ = (int(x) if _static(x) else None for x in pages_shape)
    lengths = [1, 16, 37]
    rng = np.random.default_rng(4)
    num_pages = [-(-n // page) for n in lengths]
    order = rng.permutation(12)[: sum(num_pages)].astype("int32")  # pages scattered in the pool
    pages = rng.standard_normal((12, 2, hkv, page, d)).astype(dtype)
    indptr = np.concatenate([[0], np.cumsum(num_pages)]).astype("int32")
    last = np.array([n - (p - 1) * page for n, p in zip(lengths, num_pages, strict=True)], "int32")
    q = rng.standard_normal((len(lengths), hq, d)).astype(dtype)
    sm_scale = 1 / math.sqrt(d)
    names = _names(func)
    args = dict(
        zip(
            names,
            [
                q,
                pages,
                indptr,
                order,
                last,
                np.zeros(len(lengths), "int32"),  # k_rope_pos_offset (no RoPE in the kernel)
                np.array(lengths, "int32") - 1,  # q_rope_position
                np.zeros_like(q),
                np.zeros((len(lengths), hq), "float32"),
                0,  # rotary_mode: none (the cache rotates keys as they are appended)
                1.0,
                10000.0,
                sm_scale,
            ],
            strict=True,
        )
    )
    out = _run(gpu, preset, func, **args)
    for b, n in enumerate(lengths):
        ids = order[indptr[b] : indptr[b + 1]]
        k = pages[ids, 0].transpose(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].astype(np.float64)
        v = pages[ids, 1].transpose(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].astype(np.float64)
        group = hq // hkv
        k, v = np.repeat(k, group, 0), np.repeat(v, group, 0)  # [hq, n, d]
        s = np.einsum("hd,hnd->hn", q[b].astype(np.float64), k) * sm_scale
        p = np.exp(s - s.max(-1, keepdims=True))
        _check(
            f"decode attention, {n} tokens",
            out[names[7]][b],
            np.einsum("hn,hnd->hd", p / p.sum(-1, keepdims=True), v),
        )
        lse2 = (np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)) / math.log(2)
        _check(f"decode attention log-sum-exp (base 2), {n} tokens", out[names[8]][b], lse2)

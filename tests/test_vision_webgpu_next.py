"""The Qwen2.5-VL and Gemma 3 vision towers' GPU-scheduled kernels, run as WGSL on WebGPU (Mesa's
lavapipe), against numpy, as tests/test_vision_webgpu.py does for LLaVA's.

Qwen2.5-VL: the attention restricted to windows (the segment mask, the masked scores, the
softmax), the tower's RMSNorm, its SwiGLU gate and the patch merger's first linear + GELU.
Gemma 3: the projector's 2x2 average pool (a sum kernel, then a 1/4 scale), Gemma's (1 + w)
RMSNorm on the pooled tokens (the 1 + w is its own small kernel) and the SigLIP gelu-tanh MLP.
"""

import math

import numpy as np
import pytest
from test_vision_webgpu import _dtypes, _images_first
from test_webgpu_kernels import TOLERANCE, _check, _kernel, _names, _run, _shapes

from relaxlm.compiler.pipeline import build_library
from relaxlm.compiler.targets import resolve_target
from relaxlm.frontends import export, load_checkpoint
from relaxlm.frontends.qwen2_vl import _MASKED
from relaxlm.testing.tiny_vlm import make_gemma3_vl_model, make_qwen2_5_vl_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
DTYPES = ["float32", "float16"]
IMAGES = 3  # Gemma's batch of images (symbolic in its tower's kernels)
# Qwen's patches, in window order: four windows of uneven size (a window at an image's edge
# is smaller), as the encoder lays them out.
WINDOWS = np.repeat(np.arange(4, dtype="int32"), [5, 7, 4, 8])


@pytest.fixture(scope="module")
def gpu():
    from wgsl_harness import webgpu_device

    device, info = webgpu_device()  # raises NoAdapter naming what to install
    print(f"WebGPU adapter: {info['device']} ({info['backend_type']})")
    return device


@pytest.fixture(scope="module")
def preset():
    return resolve_target("webgpu")


def _scheduled(folder, preset) -> dict:
    checkpoint = load_checkpoint(folder)
    return {
        dtype: build_library(export(checkpoint, dtype), preset, None, scheduled_only=True)[0]
        for dtype in DTYPES
    }


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, preset):
    """dtype -> the tiny Qwen2.5-VL's scheduled IRModule for webgpu."""
    return _scheduled(make_qwen2_5_vl_model(tmp_path_factory.mktemp("qwen-webgpu"), seed=3), preset)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, preset):
    """dtype -> the tiny Gemma 3's scheduled IRModule for webgpu."""
    return _scheduled(
        make_gemma3_vl_model(tmp_path_factory.mktemp("gemma3-webgpu"), seed=3), preset
    )


def _patches_first(name: str, shapes) -> bool:
    """A Qwen tower kernel: its first input's leading dimension is the symbolic patch count."""
    return bool(shapes[0]) and str(shapes[0][0]) == "num_patches"


def _ints(shape) -> list[int]:
    return [int(d) for d in shape]


def _rms(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


# -- Qwen2.5-VL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen_window_attention(gpu, preset, qwen, dtype):
    """The segment mask (0 within a window, -1e30 across), the scores q @ k^T * scale + mask and
    the softmax, each kernel on the previous one's output: keys outside the query's window get
    no weight, keys inside get numpy's softmax over the window alone."""
    mod = qwen[dtype]
    mask_fn = _kernel(mod, lambda n, s: "where" in n and _patches_first(n, s))
    scores_fn = _kernel(mod, lambda n, s: n.startswith("fused_matmul") and "add" in n)
    softmax_fn = _kernel(mod, lambda n, s: "softmax" in n)
    heads, _, head_dim = _shapes(scores_fn)[0]
    heads, head_dim, patches = int(heads), int(head_dim), len(WINDOWS)

    n = _names(mask_fn)
    square = (patches, patches)
    mask = _run(
        gpu, preset, mask_fn,
        **{n[0]: WINDOWS.reshape(-1, 1), n[1]: WINDOWS.reshape(1, -1),
           n[2]: np.array(0.0, "float32"), n[3]: np.array(_MASKED, "float32"),
           n[4]: np.zeros(square, "float32")},
    )[n[4]]  # fmt: skip
    inside = WINDOWS[:, None] == WINDOWS[None, :]
    np.testing.assert_array_equal(mask, np.where(inside, 0.0, _MASKED).astype("float32"))

    rng = np.random.default_rng(4)
    q, k = (rng.standard_normal((2, heads, patches, head_dim)) * 2).astype(_dtypes(scores_fn)[0])
    n = _names(scores_fn)
    scores = _run(
        gpu, preset, scores_fn,
        **{n[0]: q, n[1]: np.ascontiguousarray(k.swapaxes(-1, -2)), n[2]: mask,
           n[3]: np.zeros((heads, *square), _dtypes(scores_fn)[3])},
    )[n[3]]  # fmt: skip
    raw = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / math.sqrt(head_dim)
    _check("scores within windows", scores[:, inside], raw[:, inside], tolerance=TOLERANCE[dtype])
    assert (scores[:, ~inside] < _MASKED / 2).all()

    n = _names(softmax_fn)
    probs = _run(
        gpu,
        preset,
        softmax_fn,
        **{n[0]: scores, n[1]: np.zeros((heads, *square), _dtypes(softmax_fn)[1])},
    )[n[1]]
    want = np.zeros_like(raw)
    for w in np.unique(WINDOWS):
        keys = WINDOWS == w
        block = raw[:, keys][:, :, keys]
        e = np.exp(block - block.max(-1, keepdims=True))
        want[np.ix_(np.arange(heads), keys, keys)] = e / e.sum(-1, keepdims=True)
    _check("softmax within windows", probs, want, tolerance=TOLERANCE[dtype])
    got = probs.astype(np.float64)
    assert got[:, ~inside].max() == 0.0  # exp(-1e30 - max) underflows to exactly 0
    assert (got[:, inside] > 1e-6).mean() > 0.9  # the window's keys share the weight
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=TOLERANCE[dtype][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen_rms_norm_and_swiglu_gate(gpu, preset, qwen, dtype):
    """The tower's RMSNorm (eps 1e-6, weight times x) and its fused SwiGLU gate:
    silu(x @ W_gate^T + b_gate) * up."""
    mod = qwen[dtype]
    norm = _kernel(mod, lambda n, s: "rms_norm" in n and _patches_first(n, s))
    gate = _kernel(mod, lambda n, s: "silu" in n and _patches_first(n, s))
    rng = np.random.default_rng(5)
    patches = len(WINDOWS)

    hidden = int(_shapes(norm)[0][1])
    x = rng.standard_normal((patches, hidden)).astype(dtype)
    weight = rng.standard_normal(hidden).astype(dtype)
    names = _names(norm)
    out = _run(gpu, preset, norm, **dict(zip(names, [x, weight, np.zeros_like(x)], strict=True)))
    _check("Qwen vision RMSNorm", out[names[2]], _rms(x.astype(np.float64), weight))

    _, w_shape, b_shape, up_shape, _ = _shapes(gate)
    x = rng.standard_normal((patches, int(w_shape[1]))).astype(dtype)
    w = (rng.standard_normal(_ints(w_shape)) / math.sqrt(int(w_shape[1]))).astype(dtype)
    b = rng.standard_normal(_ints(b_shape)).astype(dtype)
    up = rng.standard_normal((patches, int(up_shape[1]))).astype(dtype)
    names = _names(gate)
    out = _run(
        gpu, preset, gate,
        **dict(zip(names, [x, w, b, up, np.zeros_like(up)], strict=True)),
    )[names[4]]  # fmt: skip
    z = x.astype(np.float64) @ w.astype(np.float64).T + b
    _check("SwiGLU gate", out, z / (1 + np.exp(-z)) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen_patch_merger_fc1(gpu, preset, qwen, dtype):
    """The merger's first linear over 2x2 merged patches (rows = patches / 4, a shape the kernel
    takes from the scalar patch count) with its bias and the exact (erf) GELU, fused."""
    func = _kernel(qwen[dtype], lambda n, s: "gelu" in n and "num_patches" in str(s[0][0]))
    _, w_shape, b_shape, _, _ = _shapes(func)
    patches = len(WINDOWS)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((patches // 4, int(w_shape[1]))).astype(dtype)
    w = (rng.standard_normal(_ints(w_shape)) / math.sqrt(int(w_shape[1]))).astype(dtype)
    b = rng.standard_normal(_ints(b_shape)).astype(dtype)
    y = np.zeros((patches // 4, int(w_shape[0])), dtype)
    names = _names(func)
    out = _run(gpu, preset, func, **dict(zip(names, [x, w, b, patches, y], strict=True)))
    z = x.astype(np.float64) @ w.astype(np.float64).T + b
    erf = np.vectorize(math.erf)
    _check("merger fc1 + GELU", out[names[4]], 0.5 * z * (1 + erf(z / math.sqrt(2))))


# -- Gemma 3 ------------------------------------------------------------------------------------


def _pool_2x2(tokens: np.ndarray, side: int) -> np.ndarray:
    """[images, side*side, c] row-major patch grids -> [images, (side/2)^2, c] 2x2 means."""
    grid = tokens.reshape(tokens.shape[0], side, side, -1)
    out = [
        grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(axis=(1, 2))
        for r in range(side // 2)
        for c in range(side // 2)
    ]
    return np.stack(out, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma3_average_pool_and_soft_embedding_norm(gpu, preset, gemma3, dtype):
    """The projector: the 4x4 patch grid summed over 2x2 windows, scaled by 1/4 (two kernels),
    then Gemma's RMSNorm with weight 1 + w (the 1 + w its own kernel), each on the previous
    kernel's output, against numpy's average pool and RMSNorm."""
    mod = gemma3[dtype]
    summed = _kernel(mod, lambda n, s: n.startswith("sum") and _images_first(n, s))
    scale = _kernel(mod, lambda n, s: n.startswith("multiply") and _images_first(n, s))
    norm = _kernel(mod, lambda n, s: "rms_norm" in n and _images_first(n, s))
    hidden = _ints(_shapes(norm)[1])
    one_plus = _kernel(mod, lambda n, s: "add" in n and len(s) == 2 and _ints(s[0]) == hidden)

    _, rows, kh, cols, kw, channels = _shapes(summed)[0]
    side = int(rows) * int(kh)
    assert int(cols) * int(kw) == side
    rng = np.random.default_rng(6)
    tokens = rng.standard_normal((IMAGES, side * side, int(channels))).astype(dtype)
    shape6 = (IMAGES, int(rows), int(kh), int(cols), int(kw), int(channels))
    pooled_shape = (IMAGES, int(rows), int(cols), int(channels))
    n = _names(summed)
    sums = _run(
        gpu, preset, summed, **{n[0]: tokens.reshape(shape6), n[1]: np.zeros(pooled_shape, dtype)}
    )[n[1]]
    n = _names(scale)
    pooled = _run(gpu, preset, scale, **{n[0]: sums, n[1]: np.zeros_like(sums)})[n[1]]
    want_pooled = _pool_2x2(tokens.astype(np.float64), side)
    _check("2x2 average pool", pooled.reshape(want_pooled.shape), want_pooled)

    w = (rng.standard_normal(hidden) * 0.5).astype(dtype)
    n = _names(one_plus)
    gamma = _run(gpu, preset, one_plus, **{n[0]: w, n[1]: np.zeros(hidden, _dtypes(one_plus)[1])})[
        n[1]
    ]
    _check("1 + w", gamma, 1.0 + w.astype(np.float64))

    # The norm reads the pooled tokens as the graph casts them (float32 in a float16 model).
    x = pooled.reshape(want_pooled.shape).astype(_dtypes(norm)[0])
    n = _names(norm)
    out = _run(
        gpu, preset, norm, **{n[0]: x, n[1]: gamma, n[2]: np.zeros(x.shape, _dtypes(norm)[2])}
    )[n[2]]
    _check("Gemma RMSNorm (1 + w)", out, _rms(x.astype(np.float64), 1.0 + w.astype(np.float64)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma3_siglip_gelu_tanh_mlp(gpu, preset, gemma3, dtype):
    """SigLIP's fc1 with its bias and the tanh-approximated GELU, fused."""
    func = _kernel(gemma3[dtype], lambda n, s: "gelu_tanh" in n and _images_first(n, s))
    x_shape, w_shape, b_shape, out_shape = _shapes(func)
    rng = np.random.default_rng(7)
    x = rng.standard_normal([IMAGES, *_ints(x_shape[1:])]).astype(dtype)
    w = (rng.standard_normal(_ints(w_shape)) / math.sqrt(int(w_shape[1]))).astype(dtype)
    b = rng.standard_normal(_ints(b_shape)).astype(dtype)
    y = np.zeros([IMAGES, *_ints(out_shape[1:])], dtype)
    names = _names(func)
    out = _run(gpu, preset, func, **dict(zip(names, [x, w, b, y], strict=True)))[names[3]]
    z = x.astype(np.float64) @ w.astype(np.float64).T + b
    want = 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    _check("gelu-tanh MLP", out, want)

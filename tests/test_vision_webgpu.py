"""The LLaVA vision tower's GPU-scheduled kernels, run as WGSL on WebGPU (Mesa's lavapipe), against
numpy: LayerNorm, the bidirectional attention (scores, softmax over every key, weighted sum), the
quick-GELU MLP and the patch-embedding matmul, as the pipeline builds them for the webgpu preset
(the same TIR schedules CUDA, Metal and Vulkan get). See tests/test_webgpu_kernels.py for the
text kernels and wgsl_harness.py for how a kernel runs.
"""

import math
import re

import numpy as np
import pytest
from test_webgpu_kernels import TOLERANCE, _check, _kernel, _names, _run, _shapes, _static

from relaxlm.compiler.pipeline import build_library
from relaxlm.compiler.targets import resolve_target
from relaxlm.frontends import export, load_checkpoint
from relaxlm.testing.tiny_vlm import make_llava_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
DTYPES = ["float32", "float16"]
IMAGES = 3  # the encoder's batch of images (symbolic in the kernels)


@pytest.fixture(scope="module")
def gpu():
    from wgsl_harness import webgpu_device

    device, info = webgpu_device()  # raises NoAdapter naming what to install
    print(f"WebGPU adapter: {info['device']} ({info['backend_type']})")
    return device


@pytest.fixture(scope="module")
def preset():
    return resolve_target("webgpu")


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory, preset):
    """dtype -> the tiny LLaVA's scheduled IRModule for webgpu."""
    checkpoint = load_checkpoint(make_llava_model(tmp_path_factory.mktemp("llava-webgpu")))
    return {
        dtype: build_library(export(checkpoint, dtype), preset, None, scheduled_only=True)[0]
        for dtype in DTYPES
    }


def _images_first(name: str, shapes) -> bool:
    """A tower kernel: its first input's leading dimension is the symbolic image count."""
    return bool(shapes[0]) and not _static(shapes[0][0]) and "num_images" in str(shapes[0][0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(gpu, preset, scheduled, dtype):
    func = _kernel(
        scheduled[dtype], lambda n, s: n.startswith("layer_norm") and _images_first(n, s)
    )
    _, tokens, hidden = _shapes(func)[0]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((IMAGES, int(tokens), int(hidden))).astype(dtype)
    gamma, beta = rng.standard_normal((2, int(hidden))).astype(dtype)
    names = _names(func)
    args = dict(zip(names, [x, gamma, beta, np.zeros_like(x)], strict=True))
    out = _run(gpu, preset, func, **args)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    _check("LayerNorm", out[names[3]], (x64 - mean) / np.sqrt(var + 1e-5) * gamma + beta)


def _dtypes(func) -> list[str]:
    return [str(p.ty.dtype) for p in func.params if hasattr(p.ty, "dtype")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bidirectional_attention(gpu, preset, scheduled, dtype):
    """Scores q @ k^T * scale, softmax over every key (no causal mask), then @ v: each kernel
    on the previous one's output, against numpy's attention over the same q, k, v. (In float16
    the scores come out in float32, and the softmax casts back: the graph's astype, fused.)"""
    mod = scheduled[dtype]
    scores_fn = _kernel(
        mod, lambda n, s: n.startswith("fused_matmul") and "multiply" in n and len(s) == 3
    )
    softmax_fn = _kernel(mod, lambda n, s: "softmax" in n and _images_first(n, s))
    weighted_fn = _kernel(mod, lambda n, s: n.startswith("matmul") and _images_first(n, s))
    _, heads, tokens, head_dim = (int(d) if _static(d) else IMAGES for d in _shapes(scores_fn)[0])
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((3, IMAGES, heads, tokens, head_dim)) * 2).astype(dtype)
    square = (IMAGES, heads, tokens, tokens)
    n = _names(scores_fn)
    scores = _run(
        gpu, preset, scores_fn,
        **{n[0]: q, n[1]: np.ascontiguousarray(k.swapaxes(-1, -2)),
           n[2]: np.zeros(square, _dtypes(scores_fn)[2])},
    )[n[2]]  # fmt: skip
    n = _names(softmax_fn)
    probs = _run(
        gpu, preset, softmax_fn, **{n[0]: scores, n[1]: np.zeros(square, _dtypes(softmax_fn)[1])}
    )[n[1]]
    n = _names(weighted_fn)
    out = _run(gpu, preset, weighted_fn, **{n[0]: probs, n[1]: v, n[2]: np.zeros_like(q)})[n[2]]

    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    want_scores = q64 @ k64.swapaxes(-1, -2) / math.sqrt(head_dim)
    _check("attention scores", scores, want_scores, tolerance=TOLERANCE[dtype])
    e = np.exp(want_scores - want_scores.max(-1, keepdims=True))
    want_probs = e / e.sum(-1, keepdims=True)
    _check("softmax over all keys", probs, want_probs, tolerance=TOLERANCE[dtype])
    # A causal mask would leave no weight on later keys; here they carry their share.
    later = np.triu(np.ones((tokens, tokens), dtype=bool), 1)
    assert probs.astype(np.float64)[..., later].sum() > 0.25 * want_probs[..., later].sum()
    # Each kernel against float64 over its own (rounded) inputs, as test_webgpu_kernels does.
    _check("attention output", out, probs.astype(np.float64) @ v64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quick_gelu_mlp_and_patch_embedding(gpu, preset, scheduled, dtype):
    mod = scheduled[dtype]
    fc1 = _kernel(mod, lambda n, s: "sigmoid" in n and _images_first(n, s))
    # float16: fused with its cast back from float32 sums (compiler/float32_accumulation.py)
    linear = re.compile(r"(fused_)?NT_matmul\d*(_cast\d*)?")
    patch = _kernel(mod, lambda n, s: bool(linear.fullmatch(n)) and _images_first(n, s))
    rng = np.random.default_rng(3)
    for func, act in ((fc1, "quick_gelu"), (patch, None)):
        x_shape, w_shape, *rest = _shapes(func)
        x = rng.standard_normal([IMAGES, *(int(d) for d in x_shape[1:])]).astype(dtype)
        w = rng.standard_normal([int(d) for d in w_shape]) / math.sqrt(int(w_shape[1]))
        w = w.astype(dtype)
        names = _names(func)
        args = {names[0]: x, names[1]: w}
        want = x.astype(np.float64) @ w.astype(np.float64).T
        if act:
            b = rng.standard_normal(int(w_shape[0])).astype(dtype)
            args[names[2]] = b
            want = want + b
            want = want / (1 + np.exp(-1.702 * want))
        out_name = names[-1]
        out = _run(gpu, preset, func, **args, **{out_name: np.zeros(want.shape, dtype)})
        _check(act or "patch embedding", out[out_name], want)

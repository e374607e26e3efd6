"""The polynomial exp family (`compiler/vector_math.py`) against numpy."""

import numpy as np
import tvm

from relaxlm.compiler import vector_math
from relaxlm.compiler.targets import resolve_target
from relaxlm.tvm_api import T, s_tir

PRESET = resolve_target("cpu")
X = np.concatenate(
    [np.linspace(-200, 200, 200009), [-np.inf, np.inf, -0.5, 0.5, -1e-7, -3e38, 3e38]]
).astype(np.float32)  # 200016 values: whole vectors of 16


def _apply(build, x: np.ndarray) -> np.ndarray:
    n = len(x)

    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i, lane in T.grid(n // 16, 16):
            with T.sblock("apply"):
                v = T.axis.spatial(n, i * 16 + lane)
                b[v] = build(a[v])

    sch = s_tir.Schedule(kernel)
    sch.vectorize(sch.get_loops(sch.get_sblock("apply"))[1])
    out = tvm.runtime.tensor(np.zeros_like(x), tvm.cpu())
    tvm.compile(sch.mod["main"], target=PRESET.target())(tvm.runtime.tensor(x, tvm.cpu()), out)
    return out.numpy()


def test_exp2_is_float32_exact_and_flushes_below_the_normal_range():
    got = _apply(vector_math.exp2, X)
    x = X.astype(np.float64)
    want = np.where(x < -126, 0.0, np.exp2(np.minimum(x, 127)))
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)


def test_exp_and_sigmoid_match_numpy():
    # exp2's range: 0 below 2**-126, 2**127 at most
    lowest, highest = np.float32(-126 * np.log(2)), np.float32(127 * np.log(2))
    x = X.astype(np.float64)
    want_exp = np.where(x < lowest, 0.0, np.exp(np.minimum(x, highest)))
    with np.errstate(over="ignore"):
        want_sigmoid = 1 / (1 + np.exp(-X.astype(np.float64)))
    np.testing.assert_allclose(_apply(vector_math.exp, X), want_exp, rtol=5e-7, atol=0)
    np.testing.assert_allclose(_apply(vector_math.sigmoid, X), want_sigmoid, rtol=5e-7, atol=1e-38)

"""CPU legalizations (`compiler/cpu_legalize.py`): SiLU and RMSNorm kernels against numpy."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from relaxlm.compiler import schedules
from relaxlm.compiler.cpu_legalize import legalizations
from relaxlm.compiler.targets import resolve_target
from relaxlm.tvm_api import tirx

PRESET = resolve_target("cpu")


def _build(module: nn.Module, width: int):
    """module.forward(x [1, m, width]) legalized for CPU, scheduled, and its kernels' TVMScript."""
    spec = {
        "forward": {
            "x": nn.spec.Tensor([1, "m", width], "float32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, params = module.export_tvm(spec)
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(legalizations("cpu")),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(mod)
    with PRESET.target():
        mod = schedules.for_target(PRESET)(mod)
    kernels = [f.script() for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    vm = relax.VirtualMachine(tvm.compile(mod, target=PRESET.target()), tvm.cpu())
    return vm["forward"], kernels, params


class _SwiGLU(nn.Module):
    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(x, 2, axis=-1)
        return nn.op.silu(gate) * up


def test_silu_is_vectorized_and_matches_numpy():
    forward, kernels, _ = _build(_SwiGLU(), 96)
    assert len(kernels) == 1
    assert "T.vectorized" in kernels[0] and "T.sigmoid" not in kernels[0]
    x = np.random.default_rng(0).standard_normal((1, 7, 96)).astype(np.float32) * 8
    got = forward(tvm.runtime.tensor(x, tvm.cpu()), []).numpy()
    gate, up = x[..., :48].astype(np.float64), x[..., 48:]
    np.testing.assert_allclose(got, gate / (1 + np.exp(-gate)) * up, rtol=2e-6, atol=1e-6)


class _Norm(nn.Module):
    def __init__(self, width: int):
        self.norm = nn.RMSNorm(width, -1, 1e-5, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.norm(x)


@pytest.mark.parametrize("width", [768, 70])  # 16 lanes; 2 lanes
def test_rms_norm_kernel_matches_numpy(width):
    forward, kernels, _ = _build(_Norm(width), width)
    assert any("T.parallel" in k and "T.vectorized" in k for k in kernels)
    rng = np.random.default_rng(width)
    w = rng.standard_normal(width).astype(np.float32)
    for m in (1, 5):  # a decode row (serial path) and a prefill (parallel rows)
        x = (rng.standard_normal((1, m, width)) * 3).astype(np.float32)
        got = forward(tvm.runtime.tensor(x), [tvm.runtime.tensor(w)]).numpy()
        x64 = x.astype(np.float64)
        want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * w
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

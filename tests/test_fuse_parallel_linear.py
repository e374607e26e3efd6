"""fuse_parallel_linear on a hand-made graph: which weights it fuses, and equal numbers."""

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.runtime.vm import VirtualMachine

from relaxlm.compiler.fuse_parallel_linear import fuse_parallel_linear
from relaxlm.compiler.quantization import GGUF_SCHEMES


class _Block(nn.Module):
    """Not a frontend model: q/k/v concatenated, a biased pair, and a weight used twice."""

    def __init__(self):
        self.q = nn.Linear(48, 32, bias=False)
        self.k = nn.Linear(48, 16, bias=False)
        self.v = nn.Linear(48, 16, bias=False)
        self.gate = nn.Linear(64, 40, bias=True)
        self.up = nn.Linear(64, 40, bias=True)
        self.shared = nn.Linear(40, 48, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        qkv = nn.op.concat([self.q(x), self.k(x), self.v(x)], dim=-1)  # [1, n, 64]
        h = nn.op.silu(self.gate(qkv)) * self.up(qkv)  # [1, n, 40]
        return self.shared(h) + self.shared(h * 2.0)  # two uses: never fused


def _export():
    spec = {
        "forward": {
            "x": nn.spec.Tensor([1, "n", 48], "float32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, params = _Block().export_tvm(spec)
    return mod, [name for name, _ in params], [p.shape for _, p in params]


def _matmuls(mod) -> int:
    return mod.script(show_meta=False).count("R.matmul(")


def _run(mod, x, weights):
    ex = relax.build(mod, target="llvm", relax_pipeline=relax.pipeline.default_build_pipeline())
    vm = VirtualMachine(ex, tvm.cpu())
    return vm["forward"](tvm.runtime.tensor(x), [tvm.runtime.tensor(w) for w in weights]).numpy()


def test_fuses_linears_that_share_an_input_and_keeps_the_numbers():
    mod, names, shapes = _export()
    fused, sources = fuse_parallel_linear(mod)
    groups = [[names[i] for i in s] for s in sources if len(s) > 1]
    assert groups == [["q.weight", "k.weight", "v.weight"], ["gate.weight", "up.weight"]]
    assert _matmuls(mod) == 7 and _matmuls(fused) == 4
    # The frontends' concat of q, k, v is the wide matmul's output itself: no concat left.
    assert "R.concat(" not in fused.script(show_meta=False)

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    packed = [np.concatenate([weights[i] for i in s], axis=0) for s in sources]
    x = rng.standard_normal((1, 5, 48)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, x, packed), _run(mod, x, weights), rtol=1e-5, atol=1e-5)


def test_weights_stored_in_different_formats_stay_apart():
    mod, names, _ = _export()
    stored = {names.index("v.weight"): GGUF_SCHEMES["Q6_K"]}  # q, k as floats, v as blocks
    _, sources = fuse_parallel_linear(mod, stored)
    groups = [[names[i] for i in s] for s in sources if len(s) > 1]
    assert groups == [["gate.weight", "up.weight"]]


class _NothingShared(nn.Module):
    """An embedding and one linear with a bias: three weights, no two linears share an input."""

    def __init__(self):
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 4, bias=True)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        return self.proj(self.embed(ids))


def test_nothing_to_fuse_leaves_the_module_as_it_was():
    spec = {
        "forward": {
            "ids": nn.spec.Tensor([1, "n"], "int32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, _ = _NothingShared().export_tvm(spec)
    fused, sources = fuse_parallel_linear(mod)
    tvm.ir.assert_structural_equal(fused, mod)
    assert sources == [(0,), (1,), (2,)]
    assert fuse_parallel_linear(tvm.IRModule())[1] == []
